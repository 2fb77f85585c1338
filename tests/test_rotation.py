"""Rotation for any model: dense residual rotation and the online Hadamard at down_proj,
both exact in fp32 (verified like the fold), reloaded, exported and quantized."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import build_tokenizer, make_tiny_model, save_model_dir

from lp_deploy.adapters import get_adapter
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.cli import main
from lp_deploy.errors import VerificationError
from lp_deploy.exporters import quantize
from lp_deploy.fold import compare_logits, fold_model, online_hadamard_blocker
from lp_deploy.loading import load_model
from lp_deploy.modules import HadamardInputLinear

TOL = 1e-4  # max |logit diff| / max |logit|, the fold's own default


def verify_spec(text_file: Path) -> CalibrationSpec:
    return CalibrationSpec(str(text_file), samples=2, seqlen=32, seed=1)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rot") / "dense"
    return save_model_dir(
        make_tiny_model("llama", tied=True, num_layers=3), build_tokenizer(), path
    )


def _windows(text_file: Path) -> torch.Tensor:
    return verify_spec(text_file).windows(build_tokenizer())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_rotation_and_online_hadamard_are_exact(arch: str, text_file: Path) -> None:
    model = make_tiny_model(arch, num_layers=3, sliding=False)
    folded = make_tiny_model(arch, num_layers=3, sliding=False)
    report = fold_model(folded, online_hadamard=True)
    assert report.mode == "rotated" and report.reason is None and report.online_hadamard
    downs = [get_adapter(folded).layer_adapter(x).mlp_output for x in get_adapter(folded).layers]
    assert all(isinstance(d, HadamardInputLinear) for d in downs)
    _, rel = compare_logits(model, folded, _windows(text_file))
    assert rel <= TOL
    # the rotation really happened: the embedding changed
    assert not torch.allclose(
        model.get_input_embeddings().weight, folded.get_input_embeddings().weight
    )


def test_online_hadamard_alone_is_exact(text_file: Path) -> None:
    model = make_tiny_model("llama", num_layers=2)
    folded = make_tiny_model("llama", num_layers=2)
    report = fold_model(folded, rotate=False, online_hadamard=True)
    assert report.mode == "unrotated" and report.online_hadamard
    _, rel = compare_logits(model, folded, _windows(text_file))
    assert rel <= TOL


def test_unsupported_down_proj_size() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=50,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    assert "size 50" in str(online_hadamard_blocker(get_adapter(model)))
    with pytest.raises(VerificationError, match="no Hadamard matrix of size 50"):
        fold_model(model, online_hadamard=True)


@pytest.fixture(scope="module")
def rotated_dir(dense_dir: Path, text_file: Path) -> Path:
    out = dense_dir.parent / "rotated"
    argv = ["-q", "fold", str(dense_dir), "--out", str(out), "--online-hadamard"]
    argv += ["--calib", str(text_file), "--verify-samples", "2", "--verify-seqlen", "32"]
    assert main(argv) == 0
    return out


def test_fold_cli_rotates_a_dense_model(
    dense_dir: Path, rotated_dir: Path, text_file: Path
) -> None:
    meta = json.loads((rotated_dir / "config.json").read_text())["lp_deploy"]
    fold = meta["fold"]
    assert fold["mode"] == "rotated" and fold["online_hadamard"] and fold["untied_embeddings"]
    assert fold["max_rel_diff"] <= TOL and "plan" not in meta
    dense, rotated = load_model(dense_dir), load_model(rotated_dir)  # reloaded with the transform
    adapter = get_adapter(rotated.model)
    assert isinstance(adapter.layer_adapter(adapter.layers[0]).mlp_output, HadamardInputLinear)
    _, rel = compare_logits(dense.model, rotated.model, _windows(text_file))
    assert rel <= TOL


@pytest.mark.parametrize("optimize", [0, pytest.param(2, marks=pytest.mark.heavy)])
def test_online_hadamard_exports_exactly_and_stays_fp32_when_quantized(
    optimize: int, rotated_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """Also at --optimize 2, where ORT's rewrite drops the name scopes (the transform's MatMul
    is then known by its initializer, ``...online_hadamard.cols``)."""
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
    from lp_deploy.exporters.quantize import QuantizeConfig

    fp32 = export_onnx(
        OnnxExportConfig(
            model=str(rotated_dir), out=tmp_path / "fp32", decode_steps=1, optimize=optimize
        )
    ).out
    assert read_report(fp32)["validation"]["passed"]  # with the transform vs PyTorch: 1e-3
    name = "model.model.layers.{}.mlp.down_proj.online_hadamard.cols" if optimize else ""
    hadamard = [
        (name or "model.layers.{}.mlp.down_proj.online_hadamard").format(i) for i in range(3)
    ]
    for mode in ("int8", "int4"):  # the fp32 export quantized as it is (no new trace)
        q = QuantizeConfig(
            mode, text=str(text_file), windows=2, seqlen=64, max_ppl_increase=0.5, min_agreement=0.2
        )
        out = export_onnx(OnnxExportConfig(model=str(fp32), out=tmp_path / mode, quantize=q)).out
        report = read_report(out)
        assert report["quantization"]["validation"]["passed"], mode
        assert report["quantization"]["quantized"] == 3 * 7 + 1, mode
        kept = sorted(set(quantize.matmul_weights(onnx.load(str(out / "model.onnx"))).values()))
        assert kept == hadamard, mode
