"""Serving without a tritonserver: stopping a server process group, and the python backend
model answering every request of a batch (a fake ``triton_python_backend_utils``)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lp_deploy.serving.server import ServerConfig, TritonServer

# a "server" that starts a "stub" in its process group (both hold stdout), says so, waits
# for SIGINT (KeyboardInterrupt) and exits, leaving the stub running
SERVER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def fake_server(tmp_path: Path) -> TritonServer:
    srv = TritonServer(ServerConfig(tmp_path, http_port=1, grpc_port=2))
    srv.process = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, start_new_session=True
    )
    assert srv.process.stdout is not None
    assert srv.process.stdout.readline() == b"ready\n"
    return srv


def eof_within(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether every writer of ``proc``'s stdout (server and stub) is gone."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return bool(ready) and proc.stdout.read() == b""


def record_signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    sent: list[tuple[str, int, int]] = []
    kill, killpg = os.kill, os.killpg

    def rec_kill(pid: int, sig: int) -> None:
        sent.append(("kill", pid, sig))
        kill(pid, sig)

    def rec_killpg(pid: int, sig: int) -> None:
        sent.append(("killpg", pid, sig))
        killpg(pid, sig)

    monkeypatch.setattr(os, "kill", rec_kill)
    monkeypatch.setattr(os, "killpg", rec_killpg)
    return sent


def test_stop_kills_the_group_before_reaping_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = fake_server(tmp_path)
    proc = srv.process
    assert proc is not None
    sent = record_signals(monkeypatch)
    srv.stop(timeout=10)
    assert [s[0] for s in sent] == ["kill", "killpg"] and proc.returncode is not None
    assert eof_within(proc, 10)  # the stub went with the server
    assert srv.process is None and srv.pid is None
    srv.stop()  # a no-op: the pid may be another process's by now
    assert len(sent) == 2


def test_stop_never_signals_a_server_reaped_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = fake_server(tmp_path)
    proc = srv.process
    assert proc is not None
    os.killpg(proc.pid, 9)
    proc.wait(10)  # reaped (as serve()'s wait does): its pid is free for reuse
    sent = record_signals(monkeypatch)
    srv.stop()
    assert sent == [] and srv.process is None


# --------------------------------------------------------------------------- python backend


class FakeSender:
    def __init__(self, broken: bool = False) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.broken = broken

    def send(self, response: Any = None, flags: int = 0) -> None:
        if self.broken:
            raise RuntimeError("client gone")
        self.sent.append((response, flags))


class FakeRequest:
    def __init__(self, inputs: dict[str, Any], sender: FakeSender) -> None:
        self.inputs = inputs
        self.sender = sender

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return False


class FakeTensor:
    def __init__(self, value: Any) -> None:
        self.value = value

    def as_numpy(self) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class FakeEngine:
    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, request: Any, sink: Any) -> None:
        self.submitted.append(request)


@pytest.fixture
def pb(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
        TritonError=lambda message: message,
        InferenceResponse=lambda output_tensors=None, error=None: {"error": error},
        Tensor=lambda name, value: (name, value),
        get_input_tensor_by_name=lambda request, name: (
            FakeTensor(request.inputs[name]) if name in request.inputs else None
        ),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", ns)
    return ns


def test_execute_answers_every_failed_request_and_queues_the_rest(
    pb: types.SimpleNamespace,
) -> None:
    from lp_deploy.serving.python_model import TritonPythonModel

    model = TritonPythonModel()
    model.engine = FakeEngine()
    model.default_max_tokens = 4
    text = np.array([b"hi"], dtype=object)
    senders = [FakeSender() for _ in range(4)] + [FakeSender(broken=True), FakeSender()]
    requests = [
        FakeRequest({"text_input": text}, senders[0]),
        FakeRequest({"text_input": KeyError("boom")}, senders[1]),  # not an LpDeployError
        FakeRequest({"text_input": text, "max_tokens": np.array([0])}, senders[2]),
        FakeRequest({"text_input": text, "seed": np.array(["x"], dtype=object)}, senders[3]),
        FakeRequest({"text_input": TypeError("bad")}, senders[4]),  # its client is gone
        FakeRequest({"text_input": text}, senders[5]),
    ]
    model.execute(requests)
    assert len(model.engine.submitted) == 2  # the first and the last
    assert senders[0].sent == [] and senders[5].sent == []  # the engine answers those
    for sender, match in [(senders[1], "KeyError"), (senders[2], "max_tokens"), (senders[3], "")]:
        assert len(sender.sent) == 1, match
        response, flags = sender.sent[0]
        assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL and match in response["error"]
