"""Serving without a tritonserver: stopping a server process group, picking its ports, the
python backend model answering every request of a batch (a fake
``triton_python_backend_utils``), and the clients' and benchmark's errors."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lp_deploy.errors import LpDeployError
from lp_deploy.serving import server as server_module
from lp_deploy.serving.server import HOST, ServerConfig, TritonServer, free_ports

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


# a "tritonserver" answering 200 on its HTTP port, or saying as Triton does that it is taken
FAKE_TRITON = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200)\n"
    "        self.end_headers()\n"
    "try:\n"
    "    srv = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H)\n"
    "except OSError:\n"
    "    print(f\"Socket '127.0.0.1:{sys.argv[1]}' already in use\", flush=True)\n"
    "    sys.exit(1)\n"
    "srv.serve_forever()\n"
)


@pytest.fixture
def taken_port() -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))  # not listening: a probe of it is refused at once
        yield int(s.getsockname()[1])


@pytest.fixture
def starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run FAKE_TRITON instead of tritonserver; the HTTP port of each start."""
    ports: list[int] = []

    def prepare(self: TritonServer) -> tuple[list[str], dict[str, str]]:
        ports.append(self.http_port)
        self._tmp = tmp_path / f"start{len(ports)}"
        self._tmp.mkdir()
        return [sys.executable, "-c", FAKE_TRITON, str(self.http_port)], dict(os.environ)

    monkeypatch.setattr(TritonServer, "_prepare", prepare)
    return ports


def test_free_ports_are_distinct_and_avoid_the_given_ones() -> None:
    first = free_ports(2)
    again = free_ports(3, avoid=first)
    assert len(set(first)) == 2 and len(set(again)) == 3 and not set(first) & set(again)


def test_start_retries_on_new_ports_when_a_picked_one_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_port: int, starts: list[int]
) -> None:
    real = free_ports
    picks = iter([[taken_port, real(1)[0]]])  # the race: someone binds the pick first
    monkeypatch.setattr(
        server_module, "free_ports", lambda n, avoid=(): next(picks, None) or real(n, avoid)
    )
    srv = TritonServer(ServerConfig(tmp_path, http_port=0, grpc_port=0, startup_timeout=30))
    assert srv.http_port == taken_port
    try:
        srv.start()
        assert len(starts) == 2 and srv.http_port not in (taken_port, srv.grpc_port)
        assert srv._get("/v2/health/ready") == 200
    finally:
        srv.stop()


def test_start_does_not_retry_a_port_the_user_gave(
    tmp_path: Path, taken_port: int, starts: list[int]
) -> None:
    srv = TritonServer(ServerConfig(tmp_path, taken_port, 1, startup_timeout=30))
    with pytest.raises(LpDeployError, match="already in use"):
        srv.start()
    assert starts == [taken_port] and srv.process is None


# a "tritonserver" that starts a "stub" (holding a file lock while it lives) and dies
CRASHING = (
    "import subprocess, sys, os, time\n"
    "lock = sys.argv[1]\n"
    'stub = \'import fcntl, time, sys; f = open(sys.argv[1], "w"); '
    'fcntl.flock(f, fcntl.LOCK_EX); open(sys.argv[1] + ".held", "w").close(); '
    "time.sleep(120)'\n"
    "subprocess.Popen([sys.executable, '-c', stub, lock])\n"
    "while not os.path.exists(lock + '.held'):\n"
    "    time.sleep(0.01)\n"
    "sys.exit(3)\n"
)


def test_a_server_dying_at_startup_takes_its_stubs_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    lock = tmp_path / "stub.lock"

    def prepare(self: TritonServer) -> tuple[list[str], dict[str, str]]:
        self._tmp = tmp_path / "run"
        self._tmp.mkdir()
        return [sys.executable, "-c", CRASHING, str(lock)], dict(os.environ)

    monkeypatch.setattr(TritonServer, "_prepare", prepare)
    srv = TritonServer(ServerConfig(tmp_path, 0, 0, startup_timeout=30))
    with pytest.raises(LpDeployError, match="exited with code 3"):
        srv.start()
    with open(lock) as f:  # the stub's lock is free soon (SIGKILL is asynchronous)
        for _ in range(100):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)
    raise AssertionError("the stub of the dead server still runs")


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


# --------------------------------------------------------------------------- clients


def test_grpc_needs_a_grpc_url() -> None:
    from lp_deploy.serving import client

    with pytest.raises(LpDeployError, match="gRPC address"):
        client.generate("127.0.0.1:8000", "m", "hi", "grpc-stream", 4)


def test_an_http_error_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.client
    import http.server
    import threading

    from lp_deploy.serving import client

    class Refuse(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: only the client closes

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": "no such model"}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    closed: list[object] = []
    close = http.client.HTTPConnection.close
    monkeypatch.setattr(
        http.client.HTTPConnection, "close", lambda self: (closed.append(self), close(self))[1]
    )
    srv = http.server.HTTPServer((HOST, 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"{HOST}:{srv.server_address[1]}"
        with pytest.raises(client.ServingError, match="HTTP 400: no such model"):
            client.http_generate(url, "m", "hi", 4, timeout=10)
        assert len(closed) == 1
        with pytest.raises(client.ServingError, match="HTTP 400"):
            next(client.http_generate_stream(url, "m", "hi", 4, timeout=10))
        assert len(closed) == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_silent_grpc_server_is_a_serving_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    from lp_deploy.serving import client

    class Silent:
        def __init__(self, url: str) -> None:
            pass

        def start_stream(self, callback: Any) -> None:
            pass

        def async_stream_infer(self, *args: Any, **kwargs: Any) -> None:
            pass

        def stop_stream(self, cancel_requests: bool = False) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(tritonclient_grpc, "InferenceServerClient", Silent)
    with pytest.raises(client.ServingError, match=r"no response from 127\.0\.0\.1:1 within 0\.2 s"):
        client.grpc_generate("127.0.0.1:1", "m", "hi", 4, timeout=0.2)


def test_the_benchmark_reports_why_every_single_request_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lp_deploy.benchmarks import serving as bench
    from lp_deploy.serving import client

    calls: list[str] = []

    def generate(*args: Any, **kwargs: Any) -> client.Generation:
        calls.append(args[2])
        if len(calls) == 1:  # the warm-up
            return client.Generation("ok", [1], ["ok"], [0.1], 0.1)
        raise client.ServingError("the model crashed")

    monkeypatch.setattr(client, "generate", generate)
    cfg = bench.ServingBenchConfig(model="m", clients=2, requests=2, url="127.0.0.1:1")
    with pytest.raises(
        client.ServingError, match=r"1-client pass failed \(2 errors\).*model crashed"
    ):
        bench.run_serving_bench(cfg)
