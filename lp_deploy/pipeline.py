"""Stage ``patch``: calibrate once, then select blocks and fit patches as often as needed.

:func:`calibrate` turns a dense model into a :class:`Calibrated` object (the model and its
streamed statistics); :meth:`Calibrated.plan` and :meth:`Calibrated.prune` then give any
number of pruned-and-patched models from the same statistics. :func:`run_patch` (the
``lp-deploy patch`` command) and the sweep are both written on top of that.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lp_deploy.aliases import DEFAULT_MODEL
from lp_deploy.artifacts import Kind, check_out, clean_json
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import save_patched, without_patches
from lp_deploy.errors import LpDeployError
from lp_deploy.fit import fit_patches, patch_kind
from lp_deploy.hadamard import hadamard_factors
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.perplexity import PerplexitySpec, model_perplexity
from lp_deploy.prune import apply_plan
from lp_deploy.selection import (
    SELECTION_METHODS,
    PruningPlan,
    check_prune_count,
    make_plan,
    parse_layers,
    select,
)
from lp_deploy.stats import ActivationStats, collect_stats

log = logging.getLogger(__name__)
SUMMARY = "summary.json"


@dataclass
class PatchConfig:
    """Everything the ``patch`` stage needs; mirrors ``lp-deploy patch`` options."""

    model: str = DEFAULT_MODEL
    prune: int | None = 5
    select: str = "cosine"
    patch: str = "rotate"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    perplexity: PerplexitySpec | None = None  # dense / pruned / patched perplexity
    out: Path | None = None
    overwrite: bool = False
    batch_size: int = 1
    trust_remote_code: bool = False
    progress: bool = True


@dataclass
class PatchResult:
    """What the stage produced: the pruned model, its plan, the statistics, a summary."""

    model: LoadedModel
    plan: PruningPlan
    stats: ActivationStats | None
    summary: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def needs_stats(select_method: str, kind: str) -> bool:
    """Whether selecting with ``select_method`` and fitting ``kind`` needs calibration."""
    return select_method in SELECTION_METHODS or patch_kind(kind).fit is not None


def validate_config(cfg: PatchConfig) -> None:
    """Reject bad options before any expensive work."""
    patch_kind(cfg.patch)
    if cfg.select not in SELECTION_METHODS:
        parse_layers(cfg.select)
    elif cfg.prune is None:
        raise LpDeployError(f"--select {cfg.select} needs --prune N")
    if cfg.out is not None:
        check_out(cfg.out, Kind.CHECKPOINT, cfg.overwrite)


@dataclass
class Calibrated:
    """A dense model and (when needed) its calibration statistics: select blocks and fit
    patches from them as many times as needed, without calibrating again."""

    dense: LoadedModel
    spec: CalibrationSpec
    stats: ActivationStats | None  # None: not calibrated (manual selection, no patch)

    @property
    def num_layers(self) -> int:
        return len(self.dense.adapter.layers)

    def check(self, prune: int | None, method: str, kind: str) -> None:
        """Errors that only need the model's shape: raise them before calibrating."""
        if patch_kind(kind).needs_hadamard:
            hadamard_factors(self.dense.adapter.hidden_size)  # unsupported size -> clear error
        if method in SELECTION_METHODS and prune is not None:
            check_prune_count(prune, self.num_layers)
        elif method not in SELECTION_METHODS:
            make_plan(self.num_layers, parse_layers(method), "manual")

    def plan(self, prune: int | None, method: str) -> PruningPlan:
        """The layers to delete: ``method`` is a selection method or a manual layer list."""
        return select(self.stats, self.num_layers, prune, method)

    def prune(self, plan: PruningPlan, kind: str, in_place: bool = False) -> LoadedModel:
        """The dense model with ``plan``'s layers deleted and ``kind`` patches fitted.

        A deep copy unless ``in_place`` (then the dense model itself is pruned).
        """
        fit = patch_kind(kind).fit is not None
        if fit and self.stats is None:
            raise LpDeployError(f"patch {kind!r} needs calibration statistics")
        model = self.dense.model if in_place else copy.deepcopy(self.dense.model)
        patches = fit_patches(self.stats, plan, kind) if fit and self.stats else {}
        pruned = LoadedModel(model, self.dense.tokenizer, source=dict(self.dense.source))
        apply_plan(pruned.adapter, plan, patches)
        pruned.meta = self._metadata(plan, kind)
        return pruned

    def _metadata(self, plan: PruningPlan, kind: str) -> dict[str, Any]:
        tokens = self.stats.n_tokens if self.stats else 0
        return {
            "source": self.dense.source,
            "plan": plan.to_dict(),
            "patch": {"kind": kind},
            "calibration": {**self.spec.to_dict(), "tokens": tokens},
            "fold": None,
        }


def calibrate(
    dense: LoadedModel,
    spec: CalibrationSpec,
    batch_size: int = 1,
    progress: bool = True,
) -> Calibrated:
    """Streamed statistics of ``dense`` over ``spec``'s windows."""
    windows = spec.windows(dense.tokenizer)
    stats = collect_stats(dense.adapter, windows, batch_size, progress)
    return Calibrated(dense, spec, stats)


def _perplexities(
    cfg: PatchConfig, cal: Calibrated, plan: PruningPlan, windows: Any
) -> tuple[LoadedModel, dict[str, float]]:
    """Prune in place, measuring dense, pruned and patched perplexity on the way."""
    ppl: dict[str, float] = {}

    def measure(model: Any, name: str) -> None:
        ppl[name] = model_perplexity(model, windows, cfg.batch_size, cfg.progress, f"ppl {name}")

    if windows is not None:
        measure(cal.dense.model, "dense")
    pruned = cal.prune(plan, cfg.patch, in_place=True)
    if windows is not None:
        with without_patches(pruned.adapter):
            measure(pruned.model, "pruned")
        if patch_kind(cfg.patch).fit is not None:
            measure(pruned.model, cfg.patch)
    return pruned, ppl


def run_patch(cfg: PatchConfig) -> PatchResult:
    """Run the whole ``patch`` stage; writes ``cfg.out`` (and ``summary.json``) when set."""
    validate_config(cfg)
    started = time.perf_counter()
    dense = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    cal = Calibrated(dense, cfg.calibration, None)
    cal.check(cfg.prune, cfg.select, cfg.patch)
    windows = cfg.perplexity.windows(dense.tokenizer) if cfg.perplexity else None
    if needs_stats(cfg.select, cfg.patch):
        cal = calibrate(dense, cfg.calibration, cfg.batch_size, cfg.progress)
    plan = cal.plan(cfg.prune, cfg.select)
    pruned, ppl = _perplexities(cfg, cal, plan, windows)
    summary = _summary(cfg, plan, ppl, windows, time.perf_counter() - started)
    if cfg.out is not None:
        save_patched(pruned, cfg.out, extra={SUMMARY: summary}, overwrite=cfg.overwrite)
    return PatchResult(pruned, plan, cal.stats, summary, cfg.out)


def _summary(
    cfg: PatchConfig, plan: PruningPlan, ppl: dict[str, float], windows: Any, seconds: float
) -> dict[str, Any]:
    scores = {k: v for k, v in plan.scores.items() if k != "candidates"}
    return {
        "config": clean_json(asdict(cfg)),
        "layers_before": plan.num_layers,
        "layers_after": len(plan.kept),
        "removed": plan.removed,
        "gaps": [[g.start, g.end] for g in plan.gaps],
        "selection": plan.method,
        "scores": scores,
        "perplexity": ppl,
        "perplexity_windows": None if windows is None else list(windows.shape),
        "seconds": round(seconds, 1),
    }
