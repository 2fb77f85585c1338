"""Streamed activation statistics against a one-shot computation over all tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from lp_deploy.adapters import get_adapter
from lp_deploy.calibration import sample_windows
from lp_deploy.hadamard import hadamard_matrix
from lp_deploy.stats import ActivationStats, _Recorder, _reduce, collect_stats

LAYERS = 6
D = 64


def _windows(ids: torch.Tensor, n: int = 5, seqlen: int = 24) -> torch.Tensor:
    return sample_windows(ids, n, seqlen, seed=3)


def _boundary_states(model: PreTrainedModel, windows: torch.Tensor) -> torch.Tensor:
    """(L+1, tokens, d): HF's hidden_states[0..L-1] plus the input of the final norm."""
    captured: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            out = model.model(input_ids=windows, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hidden = list(out.hidden_states)
    assert len(hidden) == LAYERS + 1
    states = torch.stack([*hidden[:LAYERS], captured[0]])
    return states.reshape(LAYERS + 1, -1, states.shape[-1]).to(torch.float64)


def _one_shot(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos_sum, abs_sum, abs_rot_sum written out from their definitions."""
    n_bound = states.shape[0]
    unit = states / states.norm(dim=-1, keepdim=True)
    cos_sum = torch.empty(n_bound, n_bound, dtype=torch.float64)
    for i in range(n_bound):
        for j in range(n_bound):
            cos_sum[i, j] = (unit[i] * unit[j]).sum()
    h = hadamard_matrix(states.shape[-1])
    return cos_sum, states.abs().sum(1), (states @ h).abs().sum(1)


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= rel, f"relative error {err:.3e} > {rel:.0e}"


def _hooks_left(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks or m._forward_pre_hooks_with_kwargs
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_stats_equal_one_shot(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor, arch: str
) -> None:
    model = tiny_model(arch, num_layers=LAYERS, dtype=torch.float64)
    windows = _windows(calib_ids)
    cos_ref, abs_ref, rot_ref = _one_shot(_boundary_states(model, windows))

    stats = collect_stats(get_adapter(model), windows, batch_size=1, progress=False)
    assert stats.n_tokens == windows.numel() == 5 * 24
    assert stats.num_layers == LAYERS
    assert stats.cos_sum.shape == (LAYERS + 1, LAYERS + 1)
    assert stats.abs_sum.shape == stats.abs_rot_sum.shape == (LAYERS + 1, D)  # type: ignore[union-attr]
    assert stats.abs_rot_sum is not None
    _assert_rel(stats.cos_sum, cos_ref, 1e-9)
    _assert_rel(stats.abs_sum, abs_ref, 1e-9)
    _assert_rel(stats.abs_rot_sum, rot_ref, 1e-9)

    # Derived quantities.
    torch.testing.assert_close(
        torch.diagonal(stats.cos_sum),
        torch.full((LAYERS + 1,), float(stats.n_tokens), dtype=torch.float64),
    )
    torch.testing.assert_close(stats.cos_sum, stats.cos_sum.T)
    assert stats.cosine(2, 4) == pytest.approx(float(cos_ref[2, 4]) / stats.n_tokens, rel=1e-9)
    embedded = model.model.embed_tokens.weight[windows.reshape(-1)].to(torch.float64)
    torch.testing.assert_close(stats.abs_mean(0), embedded.abs().mean(0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_size_does_not_change_the_sums(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor, dtype: torch.dtype
) -> None:
    model = tiny_model("qwen3", num_layers=LAYERS, dtype=dtype)
    adapter = get_adapter(model)
    windows = _windows(calib_ids)  # 5 windows: batches of 3 + 2
    one = collect_stats(adapter, windows, batch_size=1, progress=False)
    three = collect_stats(adapter, windows, batch_size=3, progress=False)
    assert one.n_tokens == three.n_tokens
    assert one.abs_rot_sum is not None and three.abs_rot_sum is not None
    # float32 models: float32 partial sums per window, so the batching shows at ~1e-7
    rel = 1e-9 if dtype == torch.float64 else 1e-6
    for a, b in [
        (one.cos_sum, three.cos_sum),
        (one.abs_sum, three.abs_sum),
        (one.abs_rot_sum, three.abs_rot_sum),
    ]:
        _assert_rel(a, b, rel)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_device_reduction_equals_the_float64_reference(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor, arch: str
) -> None:
    """A float32 model reduced on its device (float32 partial sums per window, float64
    totals) gives the statistics of the float64 reduction of the same states to 1e-5."""
    model = tiny_model(arch, num_layers=LAYERS)
    adapter = get_adapter(model)
    windows = _windows(calib_ids, n=4, seqlen=128)
    stats = collect_stats(adapter, windows, progress=False)
    totals: list[torch.Tensor] = []
    recorder = _Recorder([*adapter.layers, adapter.final_norm])
    try:
        for row in windows:
            with torch.no_grad():
                adapter.backbone(input_ids=row[None], use_cache=False)
            states = torch.stack([st.reshape(-1, D) for st in recorder.states if st is not None])
            sums = _reduce(states, rotate=True)
            totals = [t + x for t, x in zip(totals, sums, strict=True)] if totals else list(sums)  # type: ignore[misc]
    finally:
        recorder.close()
    assert stats.abs_rot_sum is not None
    for got, want in zip((stats.cos_sum, stats.abs_sum, stats.abs_rot_sum), totals, strict=True):
        _assert_rel(got, want, 1e-5)
        assert got.dtype == torch.float64


def test_hooks_are_removed(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor
) -> None:
    model = tiny_model("mistral", num_layers=LAYERS)
    adapter = get_adapter(model)
    assert _hooks_left(model) == []
    collect_stats(adapter, _windows(calib_ids, n=2), progress=False)
    assert _hooks_left(model) == []

    # ... also when the forward pass fails half way (token id beyond the vocabulary).
    bad = torch.full((1, 8), model.config.vocab_size + 5)
    with pytest.raises(IndexError):
        collect_stats(adapter, bad, progress=False)
    assert _hooks_left(model) == []


def test_boundaries_are_the_inputs_of_the_layers_and_of_the_final_norm(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor
) -> None:
    model = tiny_model("qwen2", num_layers=LAYERS)
    adapter = get_adapter(model)
    windows = _windows(calib_ids, n=2)
    recorder = _Recorder([*adapter.layers, adapter.final_norm])
    last_output: list[torch.Tensor] = []
    handle = adapter.layers[LAYERS - 1].register_forward_hook(
        lambda _m, _args, out: last_output.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            adapter.backbone(input_ids=windows, use_cache=False)
    finally:
        recorder.close()
        handle.remove()
    with torch.no_grad():
        out = model.model(input_ids=windows, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    states = recorder.states
    assert len(states) == len(hidden) == LAYERS + 1
    for b in range(LAYERS):
        assert states[b] is not None
        torch.testing.assert_close(states[b], hidden[b], rtol=0, atol=0)
    # HF's last hidden state is *after* the final norm; boundary L is its input.
    last = states[LAYERS]
    assert last is not None
    assert not torch.allclose(last, hidden[LAYERS])
    torch.testing.assert_close(last, last_output[0], rtol=0, atol=0)  # the last layer's output
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last), hidden[LAYERS])
        torch.testing.assert_close(model.model.norm(last), out.last_hidden_state)


def test_no_rotated_stats_without_a_hadamard_size(
    tiny_model: Callable[..., PreTrainedModel], calib_ids: torch.Tensor
) -> None:
    model = tiny_model("llama", num_layers=3, hidden=50, heads=5, kv_heads=1)
    stats = collect_stats(get_adapter(model), _windows(calib_ids, n=2), progress=False)
    assert stats.abs_rot_sum is None
    assert stats.abs_sum.shape == (4, 50)
    with pytest.raises(ValueError, match="no rotated statistics"):
        stats.abs_rot_mean(1)


@pytest.mark.parametrize("rotated", [True, False])
def test_save_load_round_trip(tmp_path: Path, rotated: bool) -> None:
    g = torch.Generator().manual_seed(0)
    stats = ActivationStats(
        n_tokens=123,
        cos_sum=torch.rand(5, 5, generator=g, dtype=torch.float64),
        abs_sum=torch.rand(5, D, generator=g, dtype=torch.float64),
        abs_rot_sum=torch.rand(5, D, generator=g, dtype=torch.float64) if rotated else None,
    )
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = ActivationStats.load(path)
    assert back.n_tokens == 123
    fields: list[tuple[Any, Any]] = [
        (back.cos_sum, stats.cos_sum),
        (back.abs_sum, stats.abs_sum),
    ]
    for a, b in fields:
        assert torch.equal(a, b)
    if rotated:
        assert back.abs_rot_sum is not None and stats.abs_rot_sum is not None
        assert torch.equal(back.abs_rot_sum, stats.abs_rot_sum)
    else:
        assert back.abs_rot_sum is None
