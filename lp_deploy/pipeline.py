"""Stage ``patch``: load, calibrate, select the block, fit the patch, evaluate, save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lp_deploy.adapters import ModelAdapter, get_adapter
from lp_deploy.benchmarks.perplexity import eval_windows, model_perplexity
from lp_deploy.calibration import calibration_windows
from lp_deploy.checkpoint import PatchedModel, save_patched, without_patches
from lp_deploy.errors import LpDeployError
from lp_deploy.fit import PATCH_KINDS, fit_patches
from lp_deploy.hadamard import hadamard_factors
from lp_deploy.loading import DEFAULT_MODEL, load_model
from lp_deploy.prune import apply_plan
from lp_deploy.selection import (
    METHODS,
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
    calib: str = "wikitext-2/valid.txt"
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    out: Path | None = None
    eval_ppl: str | None = None
    ppl_seqlen: int = 512
    ppl_limit: int | None = None
    batch_size: int = 1
    text_field: str = "text"
    trust_remote_code: bool = False
    progress: bool = True


@dataclass
class PatchResult:
    """What the stage produced."""

    patched: PatchedModel
    plan: PruningPlan
    stats: ActivationStats | None
    summary: dict[str, Any] = field(default_factory=dict)


def validate_config(cfg: PatchConfig) -> None:
    """Reject bad options before any expensive work."""
    if cfg.patch not in PATCH_KINDS:
        raise LpDeployError(
            f"unknown --patch {cfg.patch!r}; choose one of {', '.join(PATCH_KINDS)}"
        )
    if cfg.select not in METHODS:
        parse_layers(cfg.select)
    elif cfg.prune is None:
        raise LpDeployError(f"--select {cfg.select} needs --prune N")


def _needs_stats(cfg: PatchConfig) -> bool:
    return cfg.select in METHODS or cfg.patch != "none"


def calibrate(cfg: PatchConfig, adapter: ModelAdapter, tokenizer: Any) -> ActivationStats:
    """Calibration windows -> streamed statistics."""
    windows = calibration_windows(
        tokenizer, cfg.calib, cfg.samples, cfg.seqlen, cfg.seed, cfg.text_field
    )
    return collect_stats(adapter, windows, cfg.batch_size, cfg.progress)


def _metadata(
    cfg: PatchConfig, source: dict[str, Any], plan: PruningPlan, stats: ActivationStats | None
) -> dict[str, Any]:
    return {
        "source": source,
        "plan": plan.to_dict(),
        "patch": {"kind": cfg.patch},
        "calibration": {
            "data": str(cfg.calib),
            "samples": cfg.samples,
            "seqlen": cfg.seqlen,
            "seed": cfg.seed,
            "tokens": stats.n_tokens if stats else 0,
        },
        "fold": None,
    }


def _check_before_calibration(cfg: PatchConfig, adapter: ModelAdapter) -> None:
    """Errors that only need the model's shape: raise them before minutes of calibration."""
    if cfg.patch == "rotate":
        hadamard_factors(adapter.hidden_size)  # unsupported size -> clear error
    if cfg.select in METHODS and cfg.prune is not None:
        check_prune_count(cfg.prune, len(adapter.layers))
    else:
        make_plan(len(adapter.layers), parse_layers(cfg.select), "manual")


def run_patch(cfg: PatchConfig) -> PatchResult:
    """Run the whole ``patch`` stage; writes ``cfg.out`` (and ``summary.json``) when set."""
    validate_config(cfg)
    started = time.perf_counter()
    loaded = load_model(cfg.model, torch.float32, cfg.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    _check_before_calibration(cfg, adapter)
    windows = (
        eval_windows(tokenizer, cfg.eval_ppl, cfg.ppl_seqlen, cfg.ppl_limit)
        if cfg.eval_ppl
        else None
    )
    stats = calibrate(cfg, adapter, tokenizer) if _needs_stats(cfg) else None
    plan = select(stats, len(adapter.layers), cfg.prune, cfg.select)
    ppl: dict[str, float] = {}
    if windows is not None:
        ppl["dense"] = model_perplexity(model, windows, cfg.batch_size, cfg.progress, "ppl dense")
    patches = fit_patches(stats, plan, cfg.patch) if stats is not None else {}
    apply_plan(adapter, plan, patches)
    if windows is not None:
        with without_patches(adapter):
            ppl["pruned"] = model_perplexity(
                model, windows, cfg.batch_size, cfg.progress, "ppl pruned"
            )
        if cfg.patch != "none":
            ppl[cfg.patch] = model_perplexity(
                model, windows, cfg.batch_size, cfg.progress, f"ppl {cfg.patch}"
            )
    meta = _metadata(cfg, loaded.source, plan, stats)
    patched = PatchedModel(model, tokenizer, meta)
    summary = _summary(cfg, plan, ppl, windows, time.perf_counter() - started)
    if cfg.out is not None:
        save_patched(model, tokenizer, cfg.out, meta, extra={SUMMARY: summary})
    return PatchResult(patched, plan, stats, summary)


def _summary(
    cfg: PatchConfig,
    plan: PruningPlan,
    ppl: dict[str, float],
    windows: torch.Tensor | None,
    seconds: float,
) -> dict[str, Any]:
    scores = {k: v for k, v in plan.scores.items() if k != "candidates"}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
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


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
