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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lp_deploy.adapters import ModelAdapter
from lp_deploy.aliases import DEFAULT_MODEL
from lp_deploy.artifacts import Kind, check_out, clean_json
from lp_deploy.block_loss import BlockLoss
from lp_deploy.calibration import HOLDOUT_WINDOWS, CalibrationSpec
from lp_deploy.checkpoint import save_patched
from lp_deploy.errors import LpDeployError
from lp_deploy.fit import FitInputs, effective_kind, fit_patches, gram_requests, patch_kind
from lp_deploy.hadamard import hadamard_factors
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.offload import (
    OffloadDecision,
    decide_offload,
    load_pruned,
    load_skeleton,
    model_dir_of,
    streamed_stats,
)
from lp_deploy.perplexity import PerplexitySpec, model_perplexity
from lp_deploy.prune import apply_plan, fold_mlp_maps, set_patch
from lp_deploy.selection import (
    SELECTION_METHODS,
    Gap,
    PruningPlan,
    SelectionOptions,
    check_candidates,
    check_prune_count,
    make_plan,
    parse_layers,
    select,
)
from lp_deploy.stats import ActivationStats, GramStats, collect_gram, collect_stats

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
    ridge: float = 0.0  # least-squares kinds: relative ridge term
    candidates: int | None = None  # --select ppl: score only the K best cosine blocks
    holdout: int = HOLDOUT_WINDOWS  # --select ppl: held-back calibration windows scored
    offload: bool | None = None  # stream layers from safetensors; None: when it does not fit
    device_map: str | None = None  # "auto": accelerate spreads the model over the GPUs


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


def check_holdout(holdout: int) -> None:
    if holdout < 1:
        raise LpDeployError(f"--holdout must be at least 1 window, got {holdout}")


def validate_config(cfg: PatchConfig) -> None:
    """Reject bad options before any expensive work."""
    patch_kind(cfg.patch)
    if cfg.select not in SELECTION_METHODS:
        parse_layers(cfg.select)
    elif cfg.prune is None:
        raise LpDeployError(f"--select {cfg.select} needs --prune N")
    check_candidates(cfg.candidates, cfg.select)
    check_holdout(cfg.holdout)
    if cfg.out is not None:
        check_out(cfg.out, Kind.CHECKPOINT, cfg.overwrite)


@dataclass
class Calibrated:
    """A dense model and (when needed) its calibration statistics: select blocks and fit
    patches from them as many times as needed, without calibrating again.

    Least-squares kinds need per-gap sums (:class:`GramStats`); :meth:`prepare` collects the
    missing ones in one more pass over the calibration windows (cached in ``gram``).
    """

    dense: LoadedModel
    spec: CalibrationSpec
    stats: ActivationStats | None  # None: not calibrated (manual selection, no patch)
    ridge: float = 0.0
    gram: dict[tuple[str, int, int], GramStats] = field(default_factory=dict)
    batch_size: int = 1
    progress: bool = True
    dense_pruned: bool = False  # set once the dense model was pruned in place
    holdout: int = HOLDOUT_WINDOWS  # held-back calibration windows ``ppl`` selection scores
    scorer: BlockLoss | None = field(default=None, repr=False)  # their cached states

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

    def plan(
        self, prune: int | None, method: str, kind: str | None = None, candidates: int | None = None
    ) -> PruningPlan:
        """The layers to delete: ``method`` is a selection method or a manual layer list;
        ``ppl`` scores blocks patched with ``kind`` (``candidates``: the K best cosine ones)."""
        scorer = None
        if method in SELECTION_METHODS and SELECTION_METHODS[method].scores_blocks:
            if kind is None:
                raise LpDeployError(f"selection {method!r} needs the patch kind it scores with")
            patch_kind(kind)

            def scorer(gaps: Sequence[Gap]) -> list[float]:
                return self.block_losses(gaps, kind, desc=f"select {method} n={prune}")

        options = SelectionOptions(candidates, scorer)
        return select(self.stats, self.num_layers, prune, method, options)

    def block_losses(
        self,
        gaps: Sequence[Gap],
        kind: str,
        windows: torch.Tensor | None = None,
        desc: str = "blocks",
    ) -> list[float]:
        """Mean next-token NLL of the dense model with each gap deleted and ``kind`` fitted
        there, on ``windows`` (default: :attr:`holdout` calibration windows that share no
        token with the fitting windows); only the layers after each gap are run."""
        if self.dense_pruned:
            raise LpDeployError("the dense model was pruned in place; score blocks before")
        plans = [make_plan(self.num_layers, list(range(g.start, g.end)), "block") for g in gaps]
        self.prepare(plans, kind)
        scorer = self._scorer() if windows is None else BlockLoss(self.dense.adapter, windows)
        folds = [self._mlp_map_layer(p, kind) for p in plans]
        scorer.ensure({g.start for g in gaps}, {i for i in folds if i is not None})
        return [
            self._block_loss(scorer, plan, kind)
            for plan in tqdm(plans, desc=desc, disable=not self.progress)
        ]

    def _scorer(self) -> BlockLoss:
        if self.scorer is None:
            windows = self.spec.holdout(self.dense.tokenizer, self.holdout)
            self.scorer = BlockLoss(self.dense.adapter, windows, self.batch_size)
        return self.scorer

    def _mlp_map_layer(self, plan: PruningPlan, kind: str) -> int | None:
        """The layer whose MLP output ``kind`` maps on ``plan``'s one gap (None: a patch)."""
        gap = plan.gaps[0]
        fitted = effective_kind(kind, gap, self.blocked(plan, kind))
        return gap.start - 1 if patch_kind(fitted).folds_into_mlp else None

    def _block_loss(self, scorer: BlockLoss, plan: PruningPlan, kind: str) -> float:
        gap = plan.gaps[0]
        patch: Any = None
        if patch_kind(kind).fit is not None:
            if self.stats is None:
                raise LpDeployError(f"patch {kind!r} needs calibration statistics")
            blocked = self.blocked(plan, kind)
            patch = fit_patches(self._fit_inputs(plan, kind), plan, kind, blocked=blocked)[gap]
        if self._mlp_map_layer(plan, kind) is not None:
            return scorer.loss(gap, mlp_map=patch.weight.data)
        return scorer.loss(gap, patch)

    def prepare(self, plans: list[PruningPlan], kind: str) -> None:
        """Collect (in one pass) the least-squares sums fitting ``kind`` on ``plans`` needs."""
        wanted = {r for p in plans for r in gram_requests(p, kind, self.blocked(p, kind))}
        missing = sorted(wanted - set(self.gram))
        if not missing:
            return
        if self.dense_pruned:
            raise LpDeployError("the dense model was pruned in place; prepare() it before")
        windows = self.spec.windows(self.dense.tokenizer)
        self.gram.update(
            collect_gram(self.dense.adapter, windows, missing, self.batch_size, self.progress)
        )

    def prune(self, plan: PruningPlan, kind: str, in_place: bool = False) -> LoadedModel:
        """The dense model with ``plan``'s layers deleted and ``kind`` patches fitted.

        A deep copy unless ``in_place`` (then the dense model itself is pruned).
        """
        if patch_kind(kind).fit is not None and self.stats is None:
            raise LpDeployError(f"patch {kind!r} needs calibration statistics")
        self.prepare([plan], kind)
        model = self.dense.model if in_place else copy.deepcopy(self.dense.model)
        pruned = LoadedModel(model, self.dense.tokenizer, source=dict(self.dense.source))
        apply_plan(pruned.adapter, plan)
        self.dense_pruned = self.dense_pruned or in_place
        self.install(pruned, plan, kind)
        return pruned

    def install(self, pruned: LoadedModel, plan: PruningPlan, kind: str) -> None:
        """Fit ``kind`` on ``plan`` and put it into ``pruned`` (already pruned by ``plan``):
        patch modules at the patch positions, or maps folded into down_proj weights."""
        self.prepare([plan], kind)
        record: dict[str, Any] = {"kind": kind}
        if patch_kind(kind).gram_site is not None:
            record["ridge_relative"] = self.ridge
        if patch_kind(kind).fit is not None and self.stats is not None:
            blocked = self.blocked(plan, kind)
            patches = fit_patches(self._fit_inputs(plan, kind), plan, kind, blocked=blocked)
            record.update(self._install_patches(pruned, plan, kind, patches))
        pruned.meta = self._metadata(plan, record)

    def _fit_inputs(self, plan: PruningPlan, kind: str) -> FitInputs:
        assert self.stats is not None
        gram = {}
        for gap in plan.gaps:
            site = patch_kind(effective_kind(kind, gap, self.blocked(plan, kind))).gram_site
            if site is not None:
                gram[gap] = self.gram[(site, gap.start, gap.end)]
        return FitInputs(self.stats, gram, self.ridge)

    def blocked(self, plan: PruningPlan, kind: str) -> dict[Gap, str]:
        """Gaps where ``kind`` cannot fold into the MLP before the gap, with the reason."""
        if not patch_kind(kind).folds_into_mlp:
            return {}
        found = {g: mlp_fold_blocker(self.dense.adapter, g) for g in plan.gaps}
        return {g: r for g, r in found.items() if r is not None}

    def _install_patches(
        self, pruned: LoadedModel, plan: PruningPlan, kind: str, patches: dict[Gap, Any]
    ) -> dict[str, Any]:
        record: dict[str, Any] = {}
        maps = {}
        blocked = self.blocked(plan, kind)
        for gap, patch in patches.items():
            fitted = effective_kind(kind, gap, blocked)
            if patch is not None and patch_kind(fitted).folds_into_mlp:
                maps[gap] = patch.weight.data
            elif patch is not None:
                set_patch(pruned.adapter, plan.patch_position(gap), patch)
            if fitted != kind:
                reason = blocked.get(gap) or mlp_fold_blocker(None, gap)
                warning = (
                    f"gap [{gap.start}, {gap.end}): {reason}; fitted {fitted} there instead "
                    f"of {kind} (a patch module)"
                )
                log.warning(warning)
                record.setdefault("fallbacks", []).append(
                    {"gap": [gap.start, gap.end], "kind": fitted, "reason": warning}
                )
        if maps:
            record["folded_into_down_proj"] = fold_mlp_maps(pruned.adapter, plan, maps)
        return record

    def _metadata(self, plan: PruningPlan, record: dict[str, Any]) -> dict[str, Any]:
        tokens = self.stats.n_tokens if self.stats else 0
        return {
            "source": self.dense.source,
            "plan": plan.to_dict(),
            "patch": record,
            "calibration": {**self.spec.to_dict(), "tokens": tokens},
            "fold": None,
        }


def mlp_fold_blocker(adapter: ModelAdapter | None, gap: Gap) -> str | None:
    """Why a map cannot be folded into the down_proj of the layer before ``gap`` (None: it
    can): there must be such a layer, and its MLP output must join the stream as it is."""
    if gap.start < 1:
        return "it starts at layer 0: there is no layer before it to fold a map into"
    if adapter is None:
        return None
    name = type(adapter).__name__
    if adapter.fold_blocker is not None:
        return f"{name}: the MLP output is normalised before it joins the residual stream"
    if adapter.residual_multiplier != 1.0:
        return f"{name}: the MLP output is scaled by residual_multiplier before it joins the stream"
    layer = list(adapter.layers)[gap.start - 1]
    if not isinstance(adapter.layer_adapter(layer).mlp_output, nn.Linear):
        return f"layer {gap.start - 1}'s MLP has no single down_proj (mixture of experts)"
    return None


def calibrate(
    dense: LoadedModel,
    spec: CalibrationSpec,
    batch_size: int = 1,
    progress: bool = True,
) -> Calibrated:
    """Streamed statistics of ``dense`` over ``spec``'s windows."""
    windows = spec.windows(dense.tokenizer)
    stats = collect_stats(dense.adapter, windows, batch_size, progress)
    return Calibrated(dense, spec, stats, batch_size=batch_size, progress=progress)


def _perplexities(
    cfg: PatchConfig, cal: Calibrated, plan: PruningPlan, windows: Any
) -> tuple[LoadedModel, dict[str, float]]:
    """Prune in place, measuring dense, pruned and patched perplexity on the way."""
    ppl: dict[str, float] = {}

    def measure(model: Any, name: str) -> None:
        ppl[name] = model_perplexity(model, windows, cfg.batch_size, cfg.progress, f"ppl {name}")

    if windows is not None:
        measure(cal.dense.model, "dense")
    cal.prepare([plan], cfg.patch)  # least-squares sums need the dense model
    pruned = cal.prune(plan, "none", in_place=True)
    if windows is not None:
        measure(pruned.model, "pruned")
    cal.install(pruned, plan, cfg.patch)
    if windows is not None and patch_kind(cfg.patch).fit is not None:
        measure(pruned.model, cfg.patch)
    return pruned, ppl


def run_patch(cfg: PatchConfig) -> PatchResult:
    """Run the whole ``patch`` stage; writes ``cfg.out`` (and ``summary.json``) when set."""
    validate_config(cfg)
    started = time.perf_counter()
    use_dir = cfg.offload is not False and cfg.device_map is None
    model_dir = model_dir_of(cfg.model) if use_dir else None
    decision = decide_offload(cfg.offload, model_dir, device_map=cfg.device_map)
    path = "layer-streamed from the safetensors files" if decision.offload else "in memory"
    log.info("calibration %s (%s)", path, decision.reason)
    if decision.offload:
        assert model_dir is not None
        return _run_patch_offloaded(cfg, model_dir, started, decision)
    dense = load_model(
        cfg.model, trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map
    )
    cal = Calibrated(dense, cfg.calibration, None)
    cal.check(cfg.prune, cfg.select, cfg.patch)
    windows = cfg.perplexity.windows(dense.tokenizer) if cfg.perplexity else None
    if needs_stats(cfg.select, cfg.patch):
        cal = calibrate(dense, cfg.calibration, cfg.batch_size, cfg.progress)
    cal.ridge, cal.holdout = cfg.ridge, cfg.holdout
    plan = cal.plan(cfg.prune, cfg.select, cfg.patch, cfg.candidates)
    pruned, ppl = _perplexities(cfg, cal, plan, windows)
    return _finish(cfg, cal, plan, pruned, ppl, windows, started, decision)


def _finish(
    cfg: PatchConfig,
    cal: Calibrated,
    plan: PruningPlan,
    pruned: LoadedModel,
    ppl: dict[str, float],
    windows: Any,
    started: float,
    decision: OffloadDecision,
) -> PatchResult:
    summary = _summary(cfg, plan, ppl, windows, time.perf_counter() - started)
    summary["patch"] = pruned.meta["patch"]
    summary["offload"] = asdict(decision)
    if cfg.out is not None:
        save_patched(pruned, cfg.out, extra={SUMMARY: summary}, overwrite=cfg.overwrite)
    return PatchResult(pruned, plan, cal.stats, summary, cfg.out)


def check_offload_options(cfg: PatchConfig) -> None:
    """What the layer-streamed path cannot do (it never holds the dense model)."""
    if cfg.select in SELECTION_METHODS and SELECTION_METHODS[cfg.select].scores_blocks:
        raise LpDeployError(
            f"--select {cfg.select} runs the dense model on held-back windows; it is not "
            "available with --offload (use --select cosine, or --no-offload)"
        )
    if patch_kind(cfg.patch).gram_site is not None:
        raise LpDeployError(
            f"--patch {cfg.patch}: the least-squares sums are collected in memory; with "
            "--offload use rotate, diag or none (or --no-offload)"
        )


def _run_patch_offloaded(
    cfg: PatchConfig, model_dir: Path, started: float, decision: OffloadDecision
) -> PatchResult:
    """``patch`` without the dense model in memory: statistics streamed layer by layer
    (:func:`streamed_stats`), then only the kept layers are read (:func:`load_pruned`).
    The dense perplexity is not measured (it needs the dense model)."""
    check_offload_options(cfg)
    skeleton = load_skeleton(cfg.model, cfg.trust_remote_code)
    cal = Calibrated(skeleton, cfg.calibration, None, batch_size=cfg.batch_size)
    cal.progress = cfg.progress
    cal.check(cfg.prune, cfg.select, cfg.patch)
    windows = cfg.perplexity.windows(skeleton.tokenizer) if cfg.perplexity else None
    if needs_stats(cfg.select, cfg.patch):
        calib = cfg.calibration.windows(skeleton.tokenizer)
        cal.stats = streamed_stats(
            model_dir, calib, cfg.batch_size, cfg.progress, trust_remote_code=cfg.trust_remote_code
        )
    cal.ridge = cfg.ridge
    plan = cal.plan(cfg.prune, cfg.select, cfg.patch, cfg.candidates)
    model = load_pruned(model_dir, plan, trust_remote_code=cfg.trust_remote_code)
    pruned = LoadedModel(model, skeleton.tokenizer, source=dict(skeleton.source))
    cal.dense_pruned = True
    ppl: dict[str, float] = {}
    if windows is not None:
        log.info("dense perplexity not measured: --offload never holds the dense model")
        ppl["pruned"] = model_perplexity(model, windows, cfg.batch_size, cfg.progress, "pruned")
    cal.install(pruned, plan, cfg.patch)
    if windows is not None and patch_kind(cfg.patch).fit is not None:
        ppl[cfg.patch] = model_perplexity(model, windows, cfg.batch_size, cfg.progress, cfg.patch)
    return _finish(cfg, cal, plan, pruned, ppl, windows, started, decision)


def _summary(
    cfg: PatchConfig, plan: PruningPlan, ppl: dict[str, float], windows: Any, seconds: float
) -> dict[str, Any]:
    scores = {k: v for k, v in plan.scores.items() if k not in ("candidates", "similarities")}
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
