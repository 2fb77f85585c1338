"""The ``distill`` stage on tiny random models: the prefix-cached step equals the whole model,
a killed run resumes to the same patch, the result folds and exports, bad inputs are refused
before anything is written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ARCHS

import lp_deploy.distill as distill_mod
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import load_patched
from lp_deploy.cli import main
from lp_deploy.distill import DistillConfig, run_distill, state_dir
from lp_deploy.errors import LpDeployError
from lp_deploy.fold import FoldConfig, count_patch_ops, run_fold
from lp_deploy.loading import load_model
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.pipeline import PatchConfig, run_patch
from lp_deploy.prefix import (
    first_patch_position,
    full_model_loss,
    prefix_hidden,
    suffix_hidden,
    topk_kl,
    topk_logits,
)
from lp_deploy.prune import installed_patches
from lp_deploy.shards import CacheError
from lp_deploy.teacher import teacher_topk
from lp_deploy.trainable import make_trainable

K = 8


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_DEPLOY_CACHE", str(tmp_path / "cache"))


def _patched(
    save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path, **kwargs: Any
) -> Path:
    """A 6-layer model with layers 2-3 pruned (patch in the middle) unless ``select`` says."""
    arch = kwargs.pop("arch", "llama")
    select, patch = kwargs.pop("select", "2-3"), kwargs.pop("patch", "rotate")
    name = f"{arch}-{tmp_path.name}-{kwargs.get('seed', 0)}"
    source = save_tiny_model(f"{name}-dense", arch=arch, num_layers=6, **kwargs)
    out = tmp_path / f"{arch}-patched"
    run_patch(
        PatchConfig(
            model=str(source),
            prune=None,
            select=select,
            patch=patch,
            calibration=CalibrationSpec(str(text_file), samples=4, seqlen=32),
            out=out,
            progress=False,
        )
    )
    return out


def _cfg(patched: Path, text_file: Path, out: Path, **kwargs: Any) -> DistillConfig:
    data = CalibrationSpec(str(text_file), kwargs.pop("samples", 10), 32, 0)
    defaults: dict[str, Any] = {"topk": K, "lr": 3e-3, "progress": False}
    return DistillConfig(patched, data, out=out, **{**defaults, **kwargs})


# --------------------------------------------------------------------------- acceptance 3


#: ~1 s per architecture: all run in `make test`; `make test-fast` (not slow) keeps these two
_FAST_ARCHS = ("llama", "qwen2")


@pytest.mark.parametrize(
    "arch", [a if a in _FAST_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
)
def test_prefix_cached_step_equals_the_full_model(
    arch: str,
    save_tiny_model: Callable[..., Path],
    text_file: Path,
    calib_ids: torch.Tensor,
    tmp_path: Path,
) -> None:
    """Same loss (and gradient) from the cached prefix as from the whole model, with a
    perturbed patch, on every architecture (mixed sliding/full layers, Granite's multipliers)."""
    patched = _patched(save_tiny_model, text_file, tmp_path, arch=arch)
    dense = load_model(load_patched(patched).meta["source"]["source"])
    student = load_patched(patched)
    params = make_trainable(student.adapter, "full")
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    ids = calib_ids[:96].view(2, 48)
    teacher = [teacher_topk(dense.model, row, K) for row in ids]
    top = torch.stack([t["ids"] for t in teacher]).long()
    probs = torch.stack([t["probs"] for t in teacher]).float()
    pos = first_patch_position(student.adapter)
    assert pos == 2
    prefix = prefix_hidden(student.adapter, ids, pos)
    cached = topk_kl(
        topk_logits(student.adapter, suffix_hidden(student.adapter, prefix, pos), top), probs
    )
    cached.backward()  # type: ignore[no-untyped-call]
    grad_cached = params[pos].grad.clone()  # type: ignore[union-attr]
    params[pos].grad = None
    full = full_model_loss(student.model, ids, top, probs)
    full.backward()  # type: ignore[no-untyped-call]
    assert float(full.detach()) > 1e-3
    assert abs(float(cached.detach()) - float(full.detach())) <= 1e-4
    torch.testing.assert_close(grad_cached, params[pos].grad, atol=1e-5, rtol=1e-4)
    assert len(student.adapter.layers) == 4  # the layer list was restored


def test_the_student_prefix_is_built_on_the_students_own_device(
    save_tiny_model: Callable[..., Path],
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the teacher cache reused, the prefix comes from the student: it is moved to the
    run's device first and the ids follow its parameters (a CUDA run used to send the ids to
    the GPU while the student was still on the CPU)."""
    patched = _patched(save_tiny_model, text_file, tmp_path)
    cfg = _cfg(patched, text_file, None, samples=4)
    student, position, windows, key = distill_mod._prepare(cfg)
    first = distill_mod.build_caches(cfg, student, windows, key, position)
    shutil.rmtree(distill_mod._prefix_dir(cfg))
    moved: list[torch.device] = []
    monkeypatch.setattr(distill_mod, "_to_device", lambda _model, device: moved.append(device))
    cuda = dataclasses.replace(cfg, device="cuda")  # no GPU needed: the move is recorded only
    again = distill_mod.build_caches(cuda, student, windows, key, position)
    assert again.built == ["prefix"] and moved == [torch.device("cuda")]
    torch.testing.assert_close(again.prefix.get(3, ("hidden",)), first.prefix.get(3, ("hidden",)))


# --------------------------------------------------------------------------- acceptance 4


class _Killed(Exception):
    pass


def test_resume_after_a_kill_ends_with_the_same_patch(
    save_tiny_model: Callable[..., Path],
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    patched = _patched(save_tiny_model, text_file, tmp_path)
    settings = {"epochs": 3, "patience": 3, "batch_size": 2, "save_every": 2}
    whole = run_distill(_cfg(patched, text_file, tmp_path / "whole", **settings))

    def kill(state: Any) -> None:
        if state.step == 7:  # mid epoch 2, one step after the last save
            raise _Killed

    killed_out = tmp_path / "killed"
    monkeypatch.setattr(distill_mod, "_after_step", kill)
    with pytest.raises(_Killed):
        run_distill(_cfg(patched, text_file, killed_out, **settings))
    assert not killed_out.exists() and state_dir(_cfg(patched, text_file, killed_out)).is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("LP_DEPLOY_CACHE", str(tmp_path / "cache"))
    resumed = run_distill(_cfg(patched, text_file, killed_out, resume=True, **settings))
    assert whole.summary["caches_built"] == ["teacher", "prefix (same pass)"]
    assert resumed.summary["caches_built"] == []  # both reused
    a = installed_patches(whole.model.adapter)
    b = installed_patches(load_patched(killed_out).adapter)
    assert a.keys() == b.keys() == {2}
    assert float((a[2].weight - b[2].weight).abs().max()) <= 1e-6
    assert whole.summary["val_loss"] == resumed.summary["val_loss"]
    assert whole.summary["train_loss"] == resumed.summary["train_loss"]
    assert not state_dir(_cfg(patched, text_file, killed_out)).exists()  # cleaned up


# --------------------------------------------------------------------------- acceptance 5


def test_distilled_checkpoints_fold_and_export(
    save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report

    patched = _patched(save_tiny_model, text_file, tmp_path)
    before = installed_patches(load_patched(patched).adapter)[2].weight
    for mode in ("diag", "full"):
        out = tmp_path / f"distilled-{mode}"
        cfg = _cfg(patched, text_file, out, train=mode, samples=40, val_fraction=0.25)
        result = run_distill(cfg)
        meta = json.loads((out / "config.json").read_text())["lp_deploy"]
        assert meta["patch"] == {"kind": "rotate", "trained": mode}
        assert meta["distill"]["train"] == mode and len(meta["distill"]["val_loss"]) == 2
        assert meta["distill"]["teacher"]["k"] == K
        after = installed_patches(load_patched(out).adapter)[2].weight
        assert float((after - before).abs().max()) > 1e-4  # it trained
        assert result.summary["val_loss"][1] < result.summary["val_loss"][0]
        folded = run_fold(FoldConfig(out, out=tmp_path / f"folded-{mode}", progress=False))
        assert folded.report.mode == "rotated" and folded.report.max_rel_diff <= 1e-4
        ops = count_patch_ops(folded.model.adapter)
        kind = ScalePatch if mode == "diag" else LinearPatch
        assert all(isinstance(p, kind) for p in installed_patches(folded.model.adapter).values())
        assert sum(ops.values()) == 1, ops
    export = export_onnx(
        OnnxExportConfig(model=str(tmp_path / "folded-full"), out=tmp_path / "onnx")
    )
    assert read_report(export.out)["validation"]["passed"]


def test_full_training_starts_from_a_least_squares_patch(
    save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    """An ``lstsq`` checkpoint (a fitted d x d P at the same position) trains as ``full`` from
    its fitted P, keeps its kind and still folds; ``diag`` is refused (not a rotate patch)."""
    patched = _patched(save_tiny_model, text_file, tmp_path, patch="lstsq")
    fitted = installed_patches(load_patched(patched).adapter)[2].weight
    still = run_distill(_cfg(patched, text_file, tmp_path / "still", samples=8, lr=1e-12))
    kept = installed_patches(still.model.adapter)[2].weight
    torch.testing.assert_close(kept, fitted, atol=1e-6, rtol=0)  # the start is the fitted P
    out = tmp_path / "trained"
    result = run_distill(_cfg(patched, text_file, out, samples=40, val_fraction=0.25))
    assert load_patched(out).meta["patch"] == {
        "kind": "lstsq",
        "ridge_relative": 0.0,
        "trained": "full",
    }
    after = installed_patches(load_patched(out).adapter)[2].weight
    assert float((after - fitted).abs().max()) > 1e-4
    assert result.summary["val_loss"][1] < result.summary["val_loss"][0]
    folded = run_fold(FoldConfig(out, out=tmp_path / "folded", progress=False))
    assert folded.report.max_rel_diff <= 1e-4
    with pytest.raises(LpDeployError, match="not diagonal in the Hadamard basis"):
        run_distill(_cfg(patched, text_file, tmp_path / "x", train="diag"))


# --------------------------------------------------------------------------- acceptance 6


def _nothing_written(tmp_path: Path, out: Path, before: set[str]) -> None:
    assert not out.exists()
    assert not state_dir(DistillConfig(Path("x"), out=out)).exists()
    assert {str(p) for p in tmp_path.rglob("*")} == before


def test_bad_inputs_are_refused_before_anything_is_written(
    save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    patched = _patched(save_tiny_model, text_file, tmp_path)
    cache = tmp_path / "teacher"
    run_distill(_cfg(patched, text_file, None, teacher_cache=cache, samples=4, epochs=1))
    out = tmp_path / "out"
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text()[::-1].replace("\n", " . "))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nopatch = _patched(save_tiny_model, text_file, tmp_path / "np", patch="none")
    other_model = _patched(save_tiny_model, text_file, tmp_path / "om", seed=1)
    before = {str(p) for p in tmp_path.rglob("*")}
    cases: list[tuple[DistillConfig, type[Exception], str]] = [
        (
            _cfg(patched, other_text, out, teacher_cache=cache, samples=4),
            CacheError,
            "data: cache has",
        ),
        (
            _cfg(other_model, text_file, out, teacher_cache=cache, samples=4),
            CacheError,
            "model: cache has",
        ),
        (
            _cfg(patched, text_file, out, teacher_cache=cache, samples=5),
            CacheError,
            "count: cache has",
        ),
        (_cfg(patched, text_file, out, topk=129), LpDeployError, "above the vocabulary size 128"),
        (_cfg(patched, empty, out), LpDeployError, "empty"),
        (_cfg(nopatch, text_file, out), LpDeployError, "no patch"),
        (_cfg(patched, text_file, out, resume=True), LpDeployError, "no saved training state"),
    ]
    for cfg, exc, match in cases:
        with pytest.raises(exc, match=match):
            run_distill(cfg)
        _nothing_written(tmp_path, out, before)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"patience": 0}, "--patience 0"),
        ({"save_every": -1}, "--save-every -1"),
        ({"weight_decay": -1e-4}, "--weight-decay -0.0001"),
        ({"clip": 0.0}, "clip 0.0"),
        ({"clip": float("nan")}, "clip nan"),
        ({"samples": 4, "seqlen": 1}, "--samples 4 --seqlen 1"),
    ],
)
def test_bad_training_options_are_refused(option: dict[str, Any], match: str) -> None:
    data = CalibrationSpec("t.txt", option.pop("samples", 4), option.pop("seqlen", 32), 0)
    with pytest.raises(LpDeployError, match=match):
        distill_mod.validate_config(DistillConfig(Path("p"), data, **option))


def test_folded_and_untrainable_checkpoints_are_refused(
    save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    patched = _patched(save_tiny_model, text_file, tmp_path)
    full = tmp_path / "full"
    run_distill(_cfg(patched, text_file, full, samples=4, val_fraction=0))
    with pytest.raises(LpDeployError, match="not diagonal in the Hadamard basis"):
        run_distill(_cfg(full, text_file, tmp_path / "x", train="diag"))
    run_fold(FoldConfig(patched, out=tmp_path / "folded", progress=False))
    with pytest.raises(LpDeployError, match="is folded"):
        run_distill(_cfg(tmp_path / "folded", text_file, tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli(
    save_tiny_model: Callable[..., Path],
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    patched = _patched(save_tiny_model, text_file, tmp_path)
    out = tmp_path / "cli"
    args = ["-q", "distill", str(patched), "--data", str(text_file), "--samples", "6"]
    args += ["--seqlen", "32", "--topk", "4", "--epochs", "1", "--lr", "1e-3", "--train", "diag"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and str(out) in text
    assert load_patched(out).meta["distill"]["train"] == "diag"
    noval = tmp_path / "noval"  # no validation split: the losses print as n/a
    assert main([*args, "--val-fraction", "0", "--out", str(noval)]) == 0
    assert "val loss n/a, n/a" in capsys.readouterr().out and noval.is_dir()
    assert main([*args, "--topk", "1000", "--out", str(tmp_path / "y")]) == 2
    assert "above the vocabulary" in capsys.readouterr().err


def test_a_cache_without_content_identity_is_not_reused(text_file: Path, tmp_path: Path) -> None:
    """A hub model (no sha256 recorded) or an hf: dataset can change under the same name."""
    from lp_deploy.teacher import cache_key, check_cache

    key = cache_key({"source": "org/model"}, CalibrationSpec(str(text_file), 4, 32), K)
    assert key["model"] == {"source": "org/model", "unverified": True}
    assert check_cache(tmp_path / "absent", key) is None  # building one is fine
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**key, "shards": []}))
    with pytest.raises(CacheError, match="known only by name"):
        check_cache(tmp_path / "c", key)
