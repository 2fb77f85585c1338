"""The patched SmolLM2-135M (5 of 30 layers, cosine, rotate) served by a real tritonserver:
HTTP generate, HTTP generate_stream and gRPC streaming equal local ``lp-deploy generate
--runtime onnxruntime`` token for token (32 tokens).

Heavy (patch + ONNX export + server: minutes of CPU): ``make test-all``. Set
``LP_DEPLOY_SMOLLM2_EXPORT=DIR`` to keep the export in DIR (built there when absent, reused
when present).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Runtime, create_runtime

pytest.importorskip("tritonclient.grpc", reason="pip install 'lp-deploy[triton]'")

from lp_deploy.serving import client
from lp_deploy.serving.server import ServerConfig, TritonServer, python_env, triton_dir
from lp_deploy.serving.triton_repo import TritonRepoConfig, build_repo

try:
    triton_dir(), python_env()
except LpDeployError as exc:  # pragma: no cover - make test builds them
    pytest.skip(f"{exc}", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

MODEL = "smollm2_p5"
TOKENS = 32
PROMPTS = ["The history of the city of Paris", "The capital of France is"]


@pytest.fixture(scope="module")
def export(smollm2: object, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx
    from lp_deploy.pipeline import PatchConfig, run_patch

    keep = os.environ.get("LP_DEPLOY_SMOLLM2_EXPORT")
    out = Path(keep) if keep else tmp_path_factory.mktemp("smollm2-serve") / "onnx"
    if (out / "model.onnx").is_file():
        return out
    patched = out.parent / f"{out.name}-patched"
    if not (patched / "config.json").is_file():
        spec = CalibrationSpec(str(data_dir / "wikitext-2" / "valid.txt"), 8, 256, 0)
        run_patch(
            PatchConfig(
                model="smollm2-135m",
                prune=5,
                select="cosine",
                patch="rotate",
                calibration=spec,
                out=patched,
                progress=False,
            )
        )
    # validated against PyTorch by the export tests; here only served vs local ONNX Runtime counts
    return export_onnx(OnnxExportConfig(model=str(patched), out=out, validate=False)).out


@pytest.fixture(scope="module")
def server(
    export: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> TritonServer:
    repo = tmp_path_factory.mktemp("smollm2-repo") / "repo"
    build_repo(TritonRepoConfig(export, repo, name=MODEL, threads=1))
    srv = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0))
    request.addfinalizer(srv.stop)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def local(export: Path) -> Runtime:
    return create_runtime("onnxruntime", export, threads=1)


def test_smollm2_served_equals_local_generate(
    server: TritonServer, local: Runtime, export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for prompt in PROMPTS:
        argv = ["generate", str(export), prompt, "--runtime", "onnxruntime", "--threads", "1"]
        assert main([*argv, "--max-new-tokens", str(TOKENS)]) == 0
        printed = capsys.readouterr().out
        want = local.generate(prompt, max_new_tokens=TOKENS)
        assert len(want) == TOKENS and local.decode(want) + "\n" == printed
        for protocol in client.PROTOCOLS:
            got = client.generate(
                server.url, MODEL, prompt, protocol, TOKENS, grpc_url=server.grpc_url
            )
            assert got.token_ids == want, (protocol, prompt)
            assert got.text + "\n" == printed, (protocol, prompt)
