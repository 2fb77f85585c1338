"""A real ``tritonserver`` (python backend) serving a tiny export: HTTP generate, HTTP
generate_stream and gRPC streaming equal local generation token for token; faults; unload and
reload. One server for the module, stopped by its PID in a finalizer that checks no process
of its group is left.

Needs ``make triton`` (the tritonserver wheel in ``.triton`` and the numpy<2 backend
environment ``.venv-triton``); ``make test`` builds both.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import pytest

from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Runtime, create_runtime

pytest.importorskip("tritonclient.grpc", reason="pip install 'lp-deploy[triton]'")

from lp_deploy.serving import client
from lp_deploy.serving.server import (
    ServerConfig,
    TritonServer,
    backend_stub,
    python_env,
    python_info,
    triton_dir,
)
from lp_deploy.serving.triton_repo import TritonRepoConfig, build_repo

try:  # make test builds them; the wheel may have no stub for the environment's Python
    backend_stub(triton_dir(), python_info(python_env())[0])
except LpDeployError as exc:  # pragma: no cover
    pytest.skip(f"{exc}", allow_module_level=True)

MODEL = "tiny"
TOKENS = 32
PROMPTS = ["the cat sat on the mat", "the history of the river valley begins", "water"]


@pytest.fixture(scope="module")
def server(
    tiny_export: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> TritonServer:
    repo = tmp_path_factory.mktemp("served") / "repo"
    build_repo(TritonRepoConfig(tiny_export, repo, name=MODEL, threads=1, max_batch=4))
    srv = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0))
    request.addfinalizer(lambda: stop_and_check(srv))  # by PID, even when start fails half-way
    srv.start()
    return srv


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def group_members(pgid: int) -> set[tuple[int, str]]:
    """(pid, start time) of the live processes of process group ``pgid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            found.add((int(entry.name), fields[19]))
    return found


def stop_and_check(srv: TritonServer) -> None:
    """The module's last act: the server stops by its PID, its python backend stubs with it
    (checked by start time, so a reused pid is not mistaken for one of them)."""
    pid = srv.pid
    members = group_members(pid) if pid is not None else set()
    srv.stop()
    srv.stop()  # a no-op
    alive = {(p, t) for p, t in members if (f := _stat(p)) and f[0] != "Z" and f[19] == t}
    assert pid is None or (len(members) >= 2 and not alive), (members, alive)


@pytest.fixture(scope="module")
def local(tiny_export: Path) -> Runtime:
    return create_runtime("onnxruntime", tiny_export, threads=1)


def post(server: TritonServer, path: str, body: object) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", path, json.dumps(body))
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def test_server_listens_on_loopback_only(server: TritonServer) -> None:
    assert server.process is not None and server.process.poll() is None
    assert server.models == [MODEL]  # the onnxruntime_onnx / tensorrt_plan models are not loaded
    assert server.url.startswith("127.0.0.1:")


@pytest.mark.parametrize("protocol", client.PROTOCOLS)
def test_served_generation_equals_local(
    server: TritonServer, local: Runtime, protocol: str
) -> None:
    for prompt in PROMPTS:
        got = client.generate(server.url, MODEL, prompt, protocol, TOKENS, grpc_url=server.grpc_url)
        want = local.generate(prompt, max_new_tokens=TOKENS)
        assert got.token_ids == want, (protocol, prompt)
        assert got.text == local.decode(want)
        if protocol != "http":  # one response per token (plus, maybe, a held-back tail)
            assert len(got.chunks) in (len(want), len(want) + 1)


def test_served_text_equals_the_generate_command(
    server: TritonServer, tiny_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = PROMPTS[1]
    args = ["generate", str(tiny_export), prompt, "--runtime", "onnxruntime"]
    assert main([*args, "--max-new-tokens", str(TOKENS), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert client.http_generate(server.url, MODEL, prompt, TOKENS).text + "\n" == printed
    assert (
        main(
            [
                "triton",
                "generate",
                server.url,
                MODEL,
                prompt,
                "--stream",
                "--max-tokens",
                str(TOKENS),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == printed


def test_seeded_sampling_equals_local(server: TritonServer, local: Runtime) -> None:
    params = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 11}
    got = client.grpc_generate(server.grpc_url, MODEL, PROMPTS[0], 16, **params)
    assert got.token_ids == local.generate(PROMPTS[0], 16, True, 0.8, 20, 0.9, seed=11)


# --------------------------------------------------------------------------- faults


def test_malformed_requests_get_clear_errors(server: TritonServer) -> None:
    gen = f"/v2/models/{MODEL}/generate"
    status, body = post(server, gen, {"max_tokens": 4})
    assert status == 400 and "text_input" in str(body["error"])
    # Triton 2.51 itself converts the JSON: a wrong type is its 500 "Unable to parse 'data'"
    status, body = post(server, gen, {"text_input": "a dog", "max_tokens": "many"})
    assert status in (400, 500) and "Unable to parse" in str(body["error"])
    status, body = post(server, gen, {"text_input": "a dog", "max_tokens": 0})
    assert status == 400 and "max_tokens must be >= 1" in str(body["error"])
    status, body = post(server, gen, {"text_input": "a dog", "max_tokens": 100000})
    assert status == 400 and "context of 256 tokens" in str(body["error"])
    with pytest.raises(client.ServingError, match="max_tokens must be >= 1"):
        client.grpc_generate(server.grpc_url, MODEL, "a dog", 0)


def test_wrong_dtype_over_grpc(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    inputs = client.grpc_inputs({"text_input": "a dog"})
    bad = grpcclient.InferInput("max_tokens", [1], "FP32")
    bad.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    c = grpcclient.InferenceServerClient(server.grpc_url)
    errors: list[object] = []
    c.start_stream(callback=lambda result, error: errors.append(error))
    c.async_stream_infer(MODEL, [*inputs, bad])
    c.stop_stream()
    assert errors and "max_tokens" in str(errors[0]) and "FP32" in str(errors[0])


def test_missing_model(server: TritonServer) -> None:
    status, body = post(server, "/v2/models/nope/generate", {"text_input": "a"})
    assert status in (400, 404) and "nope" in str(body["error"])
    with pytest.raises(client.ServingError, match="nope"):
        client.grpc_generate(server.grpc_url, "nope", "a", 4)


def test_disconnects_mid_stream_leave_the_server_serving(
    server: TritonServer, local: Runtime
) -> None:
    for _ in range(2):
        stream = client.http_generate_stream(server.url, MODEL, PROMPTS[0], 200)
        assert next(stream)[1] and next(stream)[1]
        stream.close()  # drops the connection mid-stream
        grpc = client.grpc_stream(server.grpc_url, MODEL, PROMPTS[1], 200)
        next(grpc)
        grpc.close()  # cancels the stream
    want = local.generate(PROMPTS[2], max_new_tokens=TOKENS)
    assert client.http_generate(server.url, MODEL, PROMPTS[2], TOKENS).token_ids == want
    assert server.process is not None and server.process.poll() is None


def test_unload_and_reload(server: TritonServer, local: Runtime) -> None:
    server.repository_call("unload", MODEL)
    assert not server.model_ready(MODEL)
    with pytest.raises(client.ServingError):
        client.http_generate(server.url, MODEL, PROMPTS[0], 4)
    server.repository_call("load", MODEL)
    assert server.model_ready(MODEL)
    want = local.generate(PROMPTS[0], max_new_tokens=TOKENS)
    assert client.http_generate(server.url, MODEL, PROMPTS[0], TOKENS).token_ids == want


def test_concurrent_clients_get_their_single_request_answers(server: TritonServer) -> None:
    from lp_deploy.benchmarks.serving import ServingBenchConfig, run_serving_bench

    cfg = ServingBenchConfig(
        model=MODEL, clients=4, requests=3, max_tokens=12, url=server.url, grpc_url=server.grpc_url
    )
    result = run_serving_bench(cfg)
    for p in (result.single, result.concurrent):
        assert p.errors == 0 and p.mismatches == 0 and p.tokens > 0
    assert result.concurrent.requests == 12 and result.throughput_ratio > 0
