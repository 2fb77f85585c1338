"""Fold stage: folded == unfolded on tiny random models of every supported architecture."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lp_deploy.adapters import get_adapter
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.errors import VerificationError
from lp_deploy.fit import fit_patches
from lp_deploy.fold import compare_logits, count_patch_ops, fold_model
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.prune import apply_plan, installed_patches
from lp_deploy.selection import make_plan
from lp_deploy.stats import collect_stats

LAYERS = 6
PLANS = {"middle": [2, 3], "first": [0, 1], "last": [4, 5], "two": [1, 4]}
REL_TOL = 1e-4
VOCAB = 64  # below the tiny tokenizer's vocabulary


Factory = Callable[..., nn.Module]


def _patched(
    factory: Factory, arch: str, tied: bool, removed: list[int], kind: str = "rotate"
) -> nn.Module:
    model = factory(arch=arch, tied=tied, num_layers=LAYERS)
    adapter = get_adapter(model)
    windows = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(adapter, windows, progress=False)
    plan = make_plan(LAYERS, removed, "manual")
    apply_plan(adapter, plan, fit_patches(stats, plan, kind))
    return model


def _ids(n: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("plan", list(PLANS))
def test_fold_is_exact(tiny_model: Factory, arch: str, tied: bool, plan: str) -> None:
    model = _patched(tiny_model, arch, tied, PLANS[plan])
    folded = copy.deepcopy(model)
    report = fold_model(folded)
    blocker = get_adapter(model).fold_blocker
    if blocker is not None:
        _check_refusal(model, folded, report, blocker)
        return
    assert report.mode == "rotated", report.reason
    assert report.untied_embeddings == tied
    gaps = len(make_plan(LAYERS, PLANS[plan], "manual").gaps)
    assert report.patch_ops == {"matmul": 0, "per_channel_mul": gaps}
    _, rel = compare_logits(model, folded, _ids())
    assert rel <= REL_TOL
    adapter = get_adapter(folded)
    for layer in adapter.layers:
        la = adapter.layer_adapter(layer)
        assert torch.all(la.attn_norm.weight == 1) and torch.all(la.mlp_norm.weight == 1)
    prompt = _ids(1, 6)
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        b = folded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def _check_refusal(model: nn.Module, folded: nn.Module, report: Any, blocker: str) -> None:
    """A family whose stream cannot be rotated: the fold says why, keeps every MatMul and
    changes nothing."""
    assert report.mode == "unrotated" and report.reason == f"cannot fold exactly: {blocker}"
    assert "post-norms" in blocker and "MatMul" in blocker
    kept = installed_patches(get_adapter(folded)).values()
    assert kept and all(isinstance(p, LinearPatch) for p in kept)
    assert report.patch_ops["per_channel_mul"] == 0
    assert report.params_after == report.params_before
    max_abs, _ = compare_logits(model, folded, _ids())
    assert max_abs == 0.0


def test_untying_costs_one_embedding_matrix(tiny_model: Factory) -> None:
    model = _patched(tiny_model, "llama", True, [2, 3])
    report = fold_model(model)
    d = 64
    vocab = model.config.vocab_size
    assert report.params_after - report.params_before == vocab * d - d * d + d


def test_no_rotate_keeps_the_matmul(tiny_model: Factory) -> None:
    model = _patched(tiny_model, "llama", True, [2, 3])
    reference = copy.deepcopy(model)
    report = fold_model(model, rotate=False)
    assert report.mode == "unrotated" and "no-rotate" in (report.reason or "")
    assert report.patch_ops == {"matmul": 1, "per_channel_mul": 0}
    assert compare_logits(reference, model, _ids())[0] == 0.0


def test_diag_patches_need_no_rotation(tiny_model: Factory) -> None:
    model = _patched(tiny_model, "qwen2", False, [1, 4], kind="diag")
    report = fold_model(model)
    assert report.mode == "unrotated" and "diag" in (report.reason or "")
    assert report.patch_ops == {"matmul": 0, "per_channel_mul": 2}


class OffsetRMSNorm(nn.Module):
    """Gemma-style ``x / rms(x) * (1 + w)``: cannot be folded as a plain RMSNorm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x * (1.0 + self.weight)


def test_unfoldable_norm_falls_back_to_matmul(
    tiny_model: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    model = _patched(tiny_model, "llama", True, [2, 3])
    layer = get_adapter(model).layer_adapter(get_adapter(model).layers[0]).layer
    layer.input_layernorm = OffsetRMSNorm(64)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model)
    report = fold_model(model)
    assert report.mode == "unrotated"
    assert "OffsetRMSNorm is not a plain RMSNorm" in (report.reason or "")
    assert "cannot fold exactly" in caplog.text
    assert report.patch_ops == {"matmul": 1, "per_channel_mul": 0}
    assert compare_logits(reference, model, _ids())[0] == 0.0


def test_adapter_blocker_falls_back(tiny_model: Factory) -> None:
    model = _patched(tiny_model, "llama", False, [2, 3])
    adapter_cls = type(get_adapter(model))
    try:
        adapter_cls.fold_blocker = "sandwich norms around each block"
        report = fold_model(model)
    finally:
        adapter_cls.fold_blocker = None
    assert report.mode == "unrotated" and "sandwich" in (report.reason or "")


def test_non_diagonal_patch_stays_matmul_but_exact(tiny_model: Factory) -> None:
    """A general (e.g. distilled) P is not diagonal after rotation: kept as H^T P H."""
    model = _patched(tiny_model, "llama", False, [2, 3])
    adapter = get_adapter(model)
    ((pos, patch),) = installed_patches(adapter).items()
    assert isinstance(patch, LinearPatch)
    with torch.no_grad():
        patch.weight.add_(0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    folded = copy.deepcopy(model)
    report = fold_model(folded)
    assert report.patch_ops == {"matmul": 1, "per_channel_mul": 0}
    assert compare_logits(model, folded, _ids())[1] <= REL_TOL
    assert isinstance(installed_patches(get_adapter(folded))[pos], LinearPatch)
    assert not isinstance(installed_patches(get_adapter(folded))[pos], ScalePatch)


def test_run_fold_refuses_to_write_a_wrong_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, text_file: Path
) -> None:
    import lp_deploy.fold as fold

    original = fold.rotate_model

    def broken(model: nn.Module, adapter: object) -> bool:
        untied = original(model, adapter)  # type: ignore[arg-type]
        with torch.no_grad():
            get_adapter(model).lm_head.weight.mul_(1.01)
        return untied

    monkeypatch.setattr(fold, "rotate_model", broken)
    out = tmp_path / "folded"
    with pytest.raises(VerificationError, match="nothing was written"):
        fold.run_fold(
            fold.FoldConfig(
                patched=tiny_checkpoint, out=out, verify=CalibrationSpec(str(text_file), 4, 16, 1)
            )
        )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_run_fold_writes_a_reloadable_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, text_file: Path
) -> None:
    from lp_deploy.checkpoint import load_patched
    from lp_deploy.fold import FoldConfig, run_fold

    out = tmp_path / "folded"
    result = run_fold(
        FoldConfig(
            patched=tiny_checkpoint, out=out, verify=CalibrationSpec(str(text_file), 4, 16, 1)
        )
    )
    folded, report = result.model, result.report
    assert result.out == out
    reloaded = load_patched(out)
    assert reloaded.meta["fold"]["mode"] == "rotated"
    assert count_patch_ops(reloaded.adapter) == report.patch_ops
    assert compare_logits(folded.model, reloaded.model, _ids())[0] <= 1e-6
    original = load_patched(tiny_checkpoint)
    assert compare_logits(original.model, reloaded.model, _ids())[1] <= REL_TOL


def test_fold_after_jsonl_calibration_needs_no_calib_again(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """The checkpoint records the whole calibration spec (text field included), so folding a
    checkpoint made from ``.jsonl --text-field body`` needs no ``--calib`` again."""
    import json

    from lp_deploy.checkpoint import read_meta
    from lp_deploy.cli import main

    data = tmp_path / "calib.jsonl"
    lines = text_file.read_text().splitlines()
    data.write_text(
        "".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(lines))
    )
    patched, folded = tmp_path / "patched", tmp_path / "folded"
    argv = ["-q", "patch", str(tiny_model_dir), "--prune", "2", "--calib", str(data)]
    argv += ["--text-field", "body", "--samples", "4", "--seqlen", "32", "--out", str(patched)]
    assert main(argv) == 0
    recorded = read_meta(patched)["calibration"]
    assert recorded["text_field"] == "body" and recorded["data"] == str(data)
    assert main(["-q", "fold", str(patched), "--verify-seqlen", "16", "--out", str(folded)]) == 0
    verified = read_meta(folded)["fold"]["verified_on"]
    assert verified["data"] == str(data) and verified["text_field"] == "body"
    assert verified["seqlen"] == 16
