"""Configs lp-deploy writes are read alike by transformers 5 and transformers 4.x.

transformers 5 stores RoPE settings only as ``rope_parameters``; transformers 4.57 (which
optimum-onnx runs on) silently falls back to ``rope_theta`` 10,000 when ``rope_theta`` is
missing. lp-deploy writes the legacy fields beside the new ones (:mod:`lp_deploy.hf_config`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, make_tiny_model

from lp_deploy.hf_config import legacy_fields
from lp_deploy.loading import load_model
from lp_deploy.sources import write_model_dir

ROOT = Path(__file__).resolve().parents[1]
COMPAT_PYTHON = ROOT / ".venv-compat" / "bin" / "python"
CHECK = ROOT / "tests" / "compat" / "check_transformers4.py"
ROPE_THETA = 100_000.0  # SmolLM2's; transformers 4's fallback is 10,000
TOL = 1e-4


def test_legacy_fields() -> None:
    rope = {"rope_theta": ROPE_THETA, "rope_type": "default"}
    assert legacy_fields({"rope_parameters": rope, "dtype": "float32"}) == {
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }
    llama3 = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert legacy_fields({"rope_parameters": llama3})["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
    }
    per_type = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    fields = legacy_fields({"rope_parameters": per_type})
    assert fields["rope_theta"] == 1e6 and fields["rope_local_base_freq"] == 1e4
    assert legacy_fields({"rope_theta": 1.0, "rope_parameters": rope}).get("rope_theta") is None


def _dense_dir(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    model = make_tiny_model("llama", num_layers=2)
    model.config.rope_parameters = {"rope_theta": ROPE_THETA, "rope_type": "default"}
    out = write_model_dir(model, build_tokenizer(), tmp_path / "dense")
    reloaded = load_model(out).model  # transformers 5
    ids = torch.randint(4, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    return out, ids, logits


def test_written_config_keeps_the_legacy_fields(tmp_path: Path) -> None:
    out, _, _ = _dense_dir(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == ROPE_THETA and config["rope_scaling"] is None
    assert config["rope_parameters"]["rope_theta"] == ROPE_THETA


def _transformers4(model_dir: Path, ids: torch.Tensor, onnx_out: Path | None) -> dict:
    ids_file = model_dir.parent / "ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    cmd = [str(COMPAT_PYTHON), str(CHECK), str(model_dir), str(ids_file)]
    if onnx_out is not None:
        cmd += ["--onnx-out", str(onnx_out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _lp_runtime_runs_optimum_export(
    model_dir: Path, export: Path, ids: torch.Tensor, logits: torch.Tensor
) -> None:
    """lp-deploy's ONNX Runtime runtime (so ``lp-deploy bench --latency``) runs optimum's export:
    same IO names (``past_key_values.N.key``, ``present.N.*``), same logits, KV cache reused."""
    from lp_deploy.runtimes.ort_runtime import OrtRuntime

    for name in ("tokenizer.json", "tokenizer_config.json"):  # optimum wrote none for the toy
        if not (export / name).is_file():
            shutil.copy(model_dir / name, export / name)
    rt = OrtRuntime(export, intra_op_num_threads=1)
    batch, n = ids.shape
    got, past = rt.forward(
        ids[:, :-1], torch.ones(batch, n - 1), torch.arange(n - 1).expand(batch, -1), None
    )
    assert (got - logits[:, :-1]).abs().max() <= TOL
    last, _ = rt.forward(ids[:, -1:], torch.ones(batch, n), torch.full((batch, 1), n - 1), past)
    assert (last[:, -1] - logits[:, -1]).abs().max() <= TOL


@pytest.mark.skipif(
    not COMPAT_PYTHON.is_file(),
    reason="compat environment .venv-compat (transformers 4.57 + optimum-onnx) is not built "
    "(make compat)",
)
def test_transformers4_and_optimum_read_it_alike(tmp_path: Path) -> None:
    out, ids, logits = _dense_dir(tmp_path)
    result = _transformers4(out, ids, tmp_path / "optimum-onnx")
    assert result["rope_theta"] == ROPE_THETA
    assert (torch.tensor(result["logits"]) - logits).abs().max() <= TOL
    assert result["onnx_max_abs_diff"] <= TOL
    _lp_runtime_runs_optimum_export(out, tmp_path / "optimum-onnx", ids, logits)

    # Without the legacy fields transformers 4 reads another model (the defect this fixes).
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key)
    config_file.write_text(json.dumps(config))
    stripped = _transformers4(out, ids, None)
    assert stripped["rope_theta"] != ROPE_THETA
    assert (torch.tensor(stripped["logits"]) - logits).abs().max() > 100 * TOL
