"""Sweep: fit a patch for each number of pruned layers and chart quality against depth."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_deploy.aliases import DEFAULT_MODEL
from lp_deploy.artifacts import Kind, check_out, clean_json, output_dir
from lp_deploy.benchmarks.flops import profile_model
from lp_deploy.benchmarks.latency import measure_interleaved, ratios
from lp_deploy.calibration import HOLDOUT_WINDOWS, CalibrationSpec
from lp_deploy.errors import LpDeployError
from lp_deploy.fit import PATCH_KINDS
from lp_deploy.fold import fold_model
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.perplexity import PerplexitySpec, model_perplexity
from lp_deploy.pipeline import Calibrated, calibrate, check_holdout
from lp_deploy.selection import SELECTION_METHODS, PruningPlan, check_candidates

#: extra per-model evaluation: (model, tokenizer) -> metrics
Evaluator = Callable[[nn.Module, Any], dict[str, float]]


@dataclass
class SweepConfig:
    """Options of ``lp-deploy sweep``."""

    model: str = DEFAULT_MODEL
    prune: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8)
    select: str = "cosine"
    patches: Sequence[str] = ("none", "rotate")  # any patch kind, "KIND+fold" also folds it
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    perplexity: PerplexitySpec | None = field(default_factory=PerplexitySpec)
    out: Path | None = None
    overwrite: bool = False
    progress: bool = True
    latency: bool = False  # time prompt + greedy decode against dense, interleaved
    latency_prompt: int = 64
    latency_tokens: int = 16
    latency_repeats: int = 3
    candidates: int | None = None  # --select ppl: the K best cosine blocks (None: all)
    holdout: int = HOLDOUT_WINDOWS  # --select ppl: held-back calibration windows


@dataclass
class SweepPoint:
    """One (n, patch kind) configuration."""

    prune: int
    patch: str
    removed: list[int]
    similarity: float | None
    layers: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)  # the plan's selection scores


FOLD_SUFFIX = "+fold"


def sweep_kinds() -> list[str]:
    """What ``--patches`` accepts: every patch kind, and ``KIND+fold`` for the fitted ones."""
    fitted = [k for k, v in PATCH_KINDS.items() if v.fit is not None]
    return [*PATCH_KINDS, *(k + FOLD_SUFFIX for k in fitted)]


def check_kinds(kinds: Sequence[str]) -> None:
    """A clear error for an unknown sweep kind."""
    bad = [k for k in kinds if k not in sweep_kinds()]
    if bad or not kinds:
        raise LpDeployError(
            f"--patches: unknown kind(s) {bad}; choose from {', '.join(sweep_kinds())}"
        )


def parse_range(spec: str) -> list[int]:
    """``'1..8'``, ``'1-8'``, ``'3,5,7'`` -> a list of ints."""
    for sep in ("..", "-"):
        if sep in spec:
            lo, hi = spec.split(sep, 1)
            return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in spec.split(",") if x.strip()]


def _evaluate(
    model: nn.Module,
    windows: torch.Tensor | None,
    extra: Evaluator | None,
    tokenizer: Any,
    progress: bool,
    label: str,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if windows is not None:
        metrics["ppl"] = model_perplexity(model, windows, progress=progress, desc=f"ppl {label}")
    if extra is not None:
        metrics.update(extra(model, tokenizer))
    return metrics


def _generation_fn(model: Any, prompt: torch.Tensor, steps: int) -> Callable[[], None]:
    """Prefill ``prompt`` then ``steps`` greedy single-token steps with the KV cache."""

    @torch.no_grad()
    def run() -> None:
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)

    return run


def latency_metrics(dense: Any, model: Any, cfg: SweepConfig) -> dict[str, float]:
    """Generation-time ratio vs dense (measured interleaved) and the FLOP-ideal ratio."""
    vocab = int(dense.config.vocab_size)
    prompt = torch.randint(
        0, vocab, (1, cfg.latency_prompt), generator=torch.Generator().manual_seed(0)
    )
    cases = {
        "dense": _generation_fn(dense, prompt, cfg.latency_tokens),
        "model": _generation_fn(model, prompt, cfg.latency_tokens),
    }
    timings = measure_interleaved(cases, repeats=cfg.latency_repeats, warmup=1)
    flops = [profile_model(m).prefill(cfg.latency_prompt) for m in (dense, model)]
    return {
        "gen_time_ratio": ratios(timings, "dense")["model"],
        "flop_ratio": flops[1] / flops[0],
    }


def _pruned(cal: Calibrated, plan: PruningPlan, kind: str) -> LoadedModel:
    """A pruned copy with ``kind`` patches; ``'KIND+fold'`` also folds it."""
    pruned = cal.prune(plan, kind.removesuffix(FOLD_SUFFIX))
    if kind.endswith(FOLD_SUFFIX):
        fold_model(pruned.model)
    return pruned


@dataclass
class SweepResult:
    """Every point of a sweep (``sweep.json``'s content) and where it was written."""

    data: dict[str, Any]
    out: Path | None = None

    @property
    def points(self) -> list[dict[str, Any]]:
        return list(self.data["points"])


def _point(
    cal: Calibrated,
    plan: PruningPlan,
    kind: str,
    measure: Callable[[nn.Module, str], dict[str, float]],
) -> SweepPoint:
    started = time.perf_counter()
    pruned = _pruned(cal, plan, kind)
    metrics = measure(pruned.model, f"n={len(plan.removed)} {kind}")
    seconds = round(time.perf_counter() - started, 1)
    similarity = plan.scores.get("similarity")
    n = len(plan.removed)
    return SweepPoint(
        n, kind, plan.removed, similarity, len(plan.kept), metrics, seconds, dict(plan.scores)
    )


def _plans(cal: Calibrated, cfg: SweepConfig) -> dict[tuple[int, str], PruningPlan]:
    """The plan of every (n, patch kind): one per n, or, for a method that scores patched
    blocks (``ppl``), one per n and fitted kind (a kind and its ``+fold`` share it)."""
    scored = cfg.select in SELECTION_METHODS and SELECTION_METHODS[cfg.select].scores_blocks
    cache: dict[tuple[int, str | None], PruningPlan] = {}
    plans = {}
    for n in cfg.prune:
        for kind in cfg.patches:
            base = kind.removesuffix(FOLD_SUFFIX) if scored else None
            if (n, base) not in cache:
                cache[(n, base)] = cal.plan(n, cfg.select, base, cfg.candidates)
            plans[(n, kind)] = cache[(n, base)]
    return plans


def run_sweep(cfg: SweepConfig, extra: Evaluator | None = None) -> SweepResult:
    """Calibrate once, then evaluate dense and every (n, patch) point; writes sweep.json/png."""
    check_kinds(cfg.patches)
    check_candidates(cfg.candidates, cfg.select)
    check_holdout(cfg.holdout)
    if cfg.out is not None:
        check_out(cfg.out, Kind.SWEEP, cfg.overwrite)
    started = time.perf_counter()
    dense = load_model(cfg.model)
    cal = calibrate(dense, cfg.calibration, progress=cfg.progress)
    cal.holdout = cfg.holdout
    ppl_windows = cfg.perplexity.windows(dense.tokenizer) if cfg.perplexity else None

    def measure(model: nn.Module, label: str) -> dict[str, float]:
        metrics = _evaluate(model, ppl_windows, extra, dense.tokenizer, cfg.progress, label)
        if cfg.latency:
            metrics.update(latency_metrics(dense.model, model, cfg))
        return metrics

    t0 = time.perf_counter()
    baseline = _evaluate(dense.model, ppl_windows, extra, dense.tokenizer, cfg.progress, "dense")
    if cfg.latency:
        baseline.update(gen_time_ratio=1.0, flop_ratio=1.0)
    baseline_seconds = round(time.perf_counter() - t0, 1)
    plans = _plans(cal, cfg)
    for kind in cfg.patches:  # least-squares sums of every point in one pass
        of_kind = [plan for (_, k), plan in plans.items() if k == kind]
        cal.prepare(of_kind, kind.removesuffix(FOLD_SUFFIX))
    points = [_point(cal, plans[(n, kind)], kind, measure) for (n, kind) in plans]
    data = {
        "config": clean_json(asdict(cfg)),
        "num_layers": cal.num_layers,
        "baseline": {"metrics": baseline, "seconds": baseline_seconds},
        "points": [asdict(p) for p in points],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cfg.out is not None:
        write_sweep(data, Path(cfg.out), cfg.overwrite)
    return SweepResult(data, cfg.out)


def write_sweep(result: dict[str, Any], out: Path, overwrite: bool = False) -> None:
    """``sweep.json`` and ``sweep.png`` (one panel per metric) in ``out``."""
    with output_dir(out, Kind.SWEEP, overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_sweep(result, tmp / "sweep.png")


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Metric against the number of pruned layers, one line per patch kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({m for p in result["points"] for m in p["metrics"]})
    if not metrics:
        return
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for kind in dict.fromkeys(p["patch"] for p in result["points"]):
            pts = [p for p in result["points"] if p["patch"] == kind and metric in p["metrics"]]
            ax.plot(
                [p["prune"] for p in pts], [p["metrics"][metric] for p in pts], "o-", label=kind
            )
        base = result["baseline"]["metrics"].get(metric)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="dense")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"layers pruned (of {result['num_layers']})")
        ax.set_ylabel(metric)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"lp-deploy sweep: {result['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
