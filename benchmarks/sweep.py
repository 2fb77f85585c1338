"""Sweep: fit a patch for each number of pruned layers and chart quality against depth.

``sweep.png`` draws every metric against the number of pruned layers (accuracies with their
standard errors as error bars), one curve per selection method and patch kind; with
``latency``, ``front.png`` draws the quality/speed front: perplexity and average accuracy
against the measured decode speed-up over the dense model.
"""

from __future__ import annotations

import json
import math
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
from lp_deploy.errors import LpDeployError, PruningPlanError
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
    select: str | Sequence[str] = "cosine"  # one method or several: every point for each
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
    select: str
    removed: list[int]
    similarity: float | None
    layers: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)  # the plan's selection scores


FOLD_SUFFIX = "+fold"
#: a metric ``M`` whose standard error is known has it under ``M + STDERR``
STDERR = "_stderr"


def methods(cfg: SweepConfig) -> list[str]:
    """The selection methods of ``cfg.select`` (one name, a comma list or a sequence)."""
    names = cfg.select.split(",") if isinstance(cfg.select, str) else list(cfg.select)
    out = [n.strip() for n in names if n.strip()]
    bad = [n for n in out if n not in SELECTION_METHODS]
    if bad or not out:
        raise PruningPlanError(
            f"sweep --select takes a comma list of {', '.join(SELECTION_METHODS)}, got "
            f"{cfg.select!r}"
        )
    return list(dict.fromkeys(out))


def check_methods(cfg: SweepConfig) -> list[str]:
    """:func:`methods`, and ``--candidates`` only where a method scores blocks."""
    names = methods(cfg)
    scoring = [m for m in names if SELECTION_METHODS[m].scores_blocks]
    check_candidates(cfg.candidates, scoring[0] if scoring else names[0])
    return names


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
    """Prefill ``prompt`` then ``steps`` greedy single-token steps with the KV cache (0: the
    prefill alone)."""

    @torch.no_grad()
    def run() -> None:
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)

    return run


def latency_metrics(dense: Any, model: Any, cfg: SweepConfig) -> dict[str, float]:
    """Against dense, measured interleaved: the generation-time ratio (prompt + decode) and
    the decode speed-up (dense decode time / the model's: each the median of prompt + decode
    less the median of the prompt alone); and the FLOP-ideal ratio."""
    vocab = int(dense.config.vocab_size)
    prompt = torch.randint(
        0, vocab, (1, cfg.latency_prompt), generator=torch.Generator().manual_seed(0)
    )
    cases = {
        f"{name}{suffix}": _generation_fn(m, prompt, steps)
        for name, m in (("dense", dense), ("model", model))
        for suffix, steps in (("", cfg.latency_tokens), (":prefill", 0))
    }
    timings = measure_interleaved(cases, repeats=cfg.latency_repeats, warmup=1)
    decode = {n: timings[n].median - timings[f"{n}:prefill"].median for n in ("dense", "model")}
    # nan where noise left no decode time to compare (a decode shorter than the prompt's noise)
    speedup = decode["dense"] / decode["model"] if min(decode.values()) > 0 else math.nan
    flops = [profile_model(m).prefill(cfg.latency_prompt) for m in (dense, model)]
    return {
        "gen_time_ratio": ratios(timings, "dense")["model"],
        "decode_speedup": speedup,
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


Key = tuple[str, int, str]  # selection method, layers pruned, patch kind


def _point(
    cal: Calibrated,
    key: Key,
    plan: PruningPlan,
    measure: Callable[[nn.Module, str], dict[str, float]],
) -> SweepPoint:
    method, n, kind = key
    started = time.perf_counter()
    pruned = _pruned(cal, plan, kind)
    metrics = measure(pruned.model, f"n={n} {method} {kind}")
    seconds = round(time.perf_counter() - started, 1)
    similarity = plan.scores.get("similarity")
    return SweepPoint(
        n,
        kind,
        method,
        plan.removed,
        similarity,
        len(plan.kept),
        metrics,
        seconds,
        dict(plan.scores),
    )


def _plans(cal: Calibrated, cfg: SweepConfig) -> dict[Key, PruningPlan]:
    """The plan of every (method, n, patch kind): one per method and n, or, for a method that
    scores patched blocks (``ppl``), one per n and fitted kind (a kind and its ``+fold``
    share it)."""
    cache: dict[tuple[str, int, str | None], PruningPlan] = {}
    plans = {}
    for method in methods(cfg):
        scored = SELECTION_METHODS[method].scores_blocks
        candidates = cfg.candidates if scored else None
        for n in cfg.prune:
            for kind in cfg.patches:
                base = kind.removesuffix(FOLD_SUFFIX) if scored else None
                if (method, n, base) not in cache:
                    cache[(method, n, base)] = cal.plan(n, method, base, candidates)
                plans[(method, n, kind)] = cache[(method, n, base)]
    return plans


def run_sweep(cfg: SweepConfig, extra: Evaluator | None = None) -> SweepResult:
    """Calibrate once, then evaluate dense and every (method, n, patch) point; writes
    sweep.json and the plots."""
    check_kinds(cfg.patches)
    check_methods(cfg)
    if cfg.latency_repeats < 1:
        raise LpDeployError(f"--latency-repeats must be >= 1, got {cfg.latency_repeats}")
    if cfg.latency and cfg.latency_tokens < 1:
        raise LpDeployError(f"latency_tokens must be >= 1, got {cfg.latency_tokens}")
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
        baseline.update(gen_time_ratio=1.0, decode_speedup=1.0, flop_ratio=1.0)
    baseline_seconds = round(time.perf_counter() - t0, 1)
    plans = _plans(cal, cfg)
    for kind in cfg.patches:  # least-squares sums of every point in one pass
        of_kind = [plan for (_, _, k), plan in plans.items() if k == kind]
        cal.prepare(of_kind, kind.removesuffix(FOLD_SUFFIX))
    points = [_point(cal, key, plan, measure) for key, plan in plans.items()]
    data = clean_json(  # strict JSON: a standard error of one question is nan -> null
        {
            "config": asdict(cfg),
            "num_layers": cal.num_layers,
            "baseline": {"metrics": baseline, "seconds": baseline_seconds},
            "points": [asdict(p) for p in points],
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    if cfg.out is not None:
        write_sweep(data, Path(cfg.out), cfg.overwrite)
    return SweepResult(data, cfg.out)


def write_sweep(result: dict[str, Any], out: Path, overwrite: bool = False) -> None:
    """``sweep.json``, ``sweep.png`` (one panel per metric) and, where the points carry a
    decode speed-up, ``front.png`` in ``out``."""
    with output_dir(out, Kind.SWEEP, overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_sweep(result, tmp / "sweep.png")
        plot_front(result, tmp / "front.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The points of each (selection method, patch kind), labelled ``kind`` when the sweep
    has one method and ``method / kind`` otherwise; in order of ``n``."""
    points = result["points"]
    several = len({p.get("select") for p in points}) > 1
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(points, key=lambda p: p["prune"]):
        label = f"{p.get('select')} / {p['patch']}" if several else p["patch"]
        curves.setdefault(label, []).append(p)
    return curves


def _series(
    pts: list[dict[str, Any]], metric: str, x: Callable[[dict[str, Any]], float | None]
) -> tuple[list[float], list[float], list[float]]:
    """``x`` of the points that have ``metric``, its values and their standard errors (0 where
    unknown)."""
    have = [p for p in pts if metric in p["metrics"]]
    return (
        [_or_nan(x(p)) for p in have],
        [_or_nan(p["metrics"][metric]) for p in have],
        [_finite_or_0(p["metrics"].get(metric + STDERR)) for p in have],
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _finite_or_0(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _panels(axes: Any, n: int, fig: Any, title: str, path: Path, plt: Any) -> None:
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Metric against the number of pruned layers, one line per (method,) patch kind, error
    bars where the standard error is known."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({m for p in result["points"] for m in p["metrics"] if not m.endswith(STDERR)})
    if not metrics:
        return
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for label, pts in _curves(result).items():
            xs, ys, errs = _series(pts, metric, lambda p: p["prune"])
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o-", capsize=3, label=label)
        base = result["baseline"]["metrics"].get(metric)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="dense")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"layers pruned (of {result['num_layers']})")
        ax.set_ylabel(metric)
        if metric == "ppl":
            ax.set_yscale("log")
    _panels(axes, len(metrics), fig, f"lp-deploy sweep: {result['config']['model']}", path, plt)


def front_metrics(result: dict[str, Any]) -> list[str]:
    """The quality metrics ``front.png`` draws: perplexity and the average accuracy (the one
    task's accuracy when there is one), where measured."""
    have = {m for p in result["points"] for m in p["metrics"]}
    accs = sorted(m for m in have if m.startswith("acc_") and not m.endswith(STDERR))
    acc = ["acc_avg"] if "acc_avg" in have else accs[:1] if len(accs) == 1 else []
    return [m for m in ("ppl",) if m in have] + acc


def plot_front(result: dict[str, Any], path: Path) -> bool:
    """Quality against the measured decode speed-up, one curve per (method,) patch kind from
    the fewest pruned layers to the most, the dense model at 1.0x; False without latency."""
    if not any("decode_speedup" in p["metrics"] for p in result["points"]):
        return False
    metrics = front_metrics(result)
    if not metrics:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        for label, pts in _curves(result).items():
            timed = [p for p in pts if "decode_speedup" in p["metrics"]]
            xs, ys, errs = _series(timed, metric, lambda p: p["metrics"]["decode_speedup"])
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o-", capsize=3, label=label)
            drawn = [p for p in timed if metric in p["metrics"]]
            for x, y, p in zip(xs, ys, drawn, strict=True):
                ax.annotate(
                    str(p["prune"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        base = result["baseline"]["metrics"]
        if metric in base:
            err = base.get(metric + STDERR)
            ax.errorbar(
                [1.0], [base[metric]], yerr=[err] if err else None, fmt="k*", ms=10, label="dense"
            )
        ax.set_xlabel("decode speed-up vs dense (measured)")
        ax.set_ylabel(metric)
        if metric == "ppl":
            ax.set_yscale("log")
    title = f"quality/speed front: {result['config']['model']} (labels: layers pruned)"
    _panels(axes, len(metrics), fig, title, path, plt)
    return True
