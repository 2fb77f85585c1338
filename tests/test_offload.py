"""Layer-streamed calibration (``--offload``) against the in-memory statistics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ARCHS

from lp_deploy.calibration import sample_windows
from lp_deploy.loading import load_model
from lp_deploy.offload import OffloadError, decide_offload, streamed_stats, weights_bytes
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
