"""Layer-streamed calibration (``--offload``) against the in-memory statistics."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ARCHS

from lp_deploy import sources
from lp_deploy.calibration import CalibrationSpec, sample_windows
from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError
from lp_deploy.loading import load_model
from lp_deploy.offload import OffloadError, decide_offload, streamed_stats, weights_bytes
from lp_deploy.perplexity import PerplexitySpec
from lp_deploy.pipeline import PatchConfig, PatchResult, run_patch
from lp_deploy.stats import ActivationStats, collect_stats

REL = 1e-5  # the tolerance; measured: bit-identical on every family below
STREAMED = [a for a in ARCHS if a != "qwen3_moe"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _assert_same(got: ActivationStats, ref: ActivationStats) -> None:
    assert got.n_tokens == ref.n_tokens
    assert _rel(got.cos_sum, ref.cos_sum) <= REL
    assert _rel(got.abs_sum, ref.abs_sum) <= REL
    assert (got.abs_rot_sum is None) == (ref.abs_rot_sum is None)
    if ref.abs_rot_sum is not None and got.abs_rot_sum is not None:
        assert _rel(got.abs_rot_sum, ref.abs_rot_sum) <= REL


@pytest.mark.parametrize("family", STREAMED)
def test_streamed_stats_equal_in_memory(
    family: str, save_tiny_model: Callable[..., Path], calib_ids: torch.Tensor
) -> None:
    """Every family (sliding windows, Gemma's local/global rotary, Granite's multipliers):
    5 windows of 40 tokens (past the 8-token window) in uneven batches of 2."""
    path = save_tiny_model(arch=family, num_layers=4)
    windows = sample_windows(calib_ids, 5, 40, seed=1)
    ref = collect_stats(load_model(path).adapter, windows, batch_size=2, progress=False)
    _assert_same(streamed_stats(path, windows, batch_size=2, progress=False), ref)


def test_sharded_checkpoint(
    tiny_model: Callable[..., torch.nn.Module],
    tokenizer: object,
    tmp_path: Path,
    calib_ids: torch.Tensor,
) -> None:
    """Tensors are found through ``model.safetensors.index.json`` across shards."""
    path = tmp_path / "sharded"
    tiny_model("llama", num_layers=3).save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    assert (path / "model.safetensors.index.json").is_file()
    windows = sample_windows(calib_ids, 2, 16, seed=0)
    ref = collect_stats(load_model(path).adapter, windows, progress=False)
    _assert_same(streamed_stats(path, windows, progress=False), ref)


def test_unconvertible_names_refused(
    save_tiny_model: Callable[..., Path], calib_ids: torch.Tensor
) -> None:
    """Qwen3-MoE's experts are fused by transformers at load time: a clear refusal."""
    path = save_tiny_model(arch="qwen3_moe", num_layers=2)
    with pytest.raises(OffloadError, match="calibrate this model in memory"):
        streamed_stats(path, sample_windows(calib_ids, 1, 8, seed=0), progress=False)


def test_not_safetensors_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(OffloadError, match=r"safetensors.*pytorch_model\.bin"):
        weights_bytes(tmp_path)


def test_auto_decision(
    save_tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_tiny_model(arch="llama", num_layers=2)
    assert not decide_offload(None, path).offload
    monkeypatch.setattr("lp_deploy.offload.available_memory", lambda: 1000)
    auto = decide_offload(None, path)
    assert auto.offload and "does not fit" in auto.reason
    assert not decide_offload(False, path).offload
    assert not decide_offload(None, None).offload
    with pytest.raises(OffloadError, match="safetensors"):
        decide_offload(True, None)


# --------------------------------------------------------------------------- the patch stage


def _patch(model: Path, text: Path, out: Path | None, **kwargs: Any) -> PatchResult:
    cfg = PatchConfig(
        model=str(model),
        prune=2,
        calibration=CalibrationSpec(str(text), samples=4, seqlen=32),
        perplexity=PerplexitySpec(str(text), seqlen=32, limit=2),
        out=out,
        progress=False,
        **kwargs,
    )
    return run_patch(cfg)


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("gemma3", False)])
def test_patch_offloaded_equals_in_memory(
    family: str,
    tied: bool,
    save_tiny_model: Callable[..., Path],
    text_file: Path,
    tmp_path: Path,
    calib_ids: torch.Tensor,
) -> None:
    """Same plan, same patch, same checkpoint logits; only the kept layers were read."""
    path = save_tiny_model(arch=family, tied=tied, num_layers=6)
    ref = _patch(path, text_file, None, offload=False)
    got = _patch(path, text_file, tmp_path / "ckpt", offload=True, patch="diag")
    ref_diag = _patch(path, text_file, tmp_path / "ref", offload=False, patch="diag")
    assert got.summary["offload"]["offload"] and not ref.summary["offload"]["offload"]
    assert got.plan.removed == ref.plan.removed == ref_diag.plan.removed
    assert got.stats is not None and ref.stats is not None
    _assert_same(got.stats, ref.stats)
    assert set(got.summary["perplexity"]) == {"pruned", "diag"}  # no dense model, no dense ppl
    assert got.summary["perplexity"]["diag"] == pytest.approx(
        ref_diag.summary["perplexity"]["diag"], rel=1e-5
    )
    ids = sample_windows(calib_ids, 1, 24, seed=5)
    reloaded = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        want = ref_diag.model.model(input_ids=ids).logits
        have = reloaded.model(input_ids=ids).logits
    assert float((have - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert reloaded.meta["calibration"]["tokens"] == 4 * 32
    for name in ("config.json", "generation_config.json"):  # the same files, lp_deploy aside
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("ckpt", "ref"))
        assert {k: v for k, v in a.items() if k != "lp_deploy"} == {
            k: v for k, v in b.items() if k != "lp_deploy"
        }


def test_patch_cli_offload_logs_its_path(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["patch", str(tiny_model_dir), "--calib", str(text_file), "--samples", "2"]
    args += ["--seqlen", "16", "--prune", "1", "--out", str(tmp_path / "a"), "--offload"]
    with caplog.at_level(logging.INFO, logger="lp_deploy.pipeline"):
        assert main(["-q", *args]) == 0
    assert "layer-streamed from the safetensors files (--offload)" in caplog.text
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["offload"] == {"offload": True, "reason": "--offload"}
    assert summary["config"]["offload"] is True


def test_device_map_reaches_the_loader(
    tiny_model_dir: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU-only ``--device-map auto``: handed to from_pretrained, statistics unchanged."""
    seen: list[Any] = []
    original = sources.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(sources.AutoModelForCausalLM, "from_pretrained", spy)
    auto = _patch(tiny_model_dir, text_file, None, device_map="auto")
    plain = _patch(tiny_model_dir, text_file, None)
    assert seen == ["auto", None]
    assert auto.summary["offload"]["reason"] == "auto: --device-map auto places the weights"
    assert auto.stats is not None and plain.stats is not None
    _assert_same(auto.stats, plain.stats)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch": "lstsq"}, "least-squares sums are collected in memory"),
        ({"select": "ppl"}, "not available with --offload"),
        ({"device_map": "auto"}, "choose one"),
    ],
)
def test_offload_refusals(
    kwargs: dict[str, Any], match: str, tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(LpDeployError, match=match):
        _patch(tiny_model_dir, text_file, tmp_path / "x", offload=True, **kwargs)
    assert not (tmp_path / "x").exists()
