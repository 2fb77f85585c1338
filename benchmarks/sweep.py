"""Sweep: fit a patch for each number of pruned layers and chart quality against depth."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_deploy.adapters import get_adapter
from lp_deploy.benchmarks.flops import profile_model
from lp_deploy.benchmarks.latency import measure_interleaved, ratios
from lp_deploy.benchmarks.perplexity import eval_windows, model_perplexity
from lp_deploy.calibration import calibration_windows
from lp_deploy.fit import fit_patches
from lp_deploy.fold import fold_model
from lp_deploy.loading import DEFAULT_MODEL, load_model
from lp_deploy.prune import apply_plan
from lp_deploy.selection import PruningPlan, select
from lp_deploy.stats import ActivationStats, collect_stats

#: extra per-model evaluation: (model, tokenizer) -> metrics
Evaluator = Callable[[nn.Module, Any], dict[str, float]]


@dataclass
class SweepConfig:
    """Options of ``lp-deploy sweep``."""

    model: str = DEFAULT_MODEL
    prune: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8)
    select: str = "cosine"
    patches: Sequence[str] = ("none", "rotate")  # also "diag", and "rotate+fold" (folded)
    calib: str = "wikitext-2/valid.txt"
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    ppl: str | None = "wikitext-2/test.txt"
    ppl_seqlen: int = 512
    ppl_limit: int | None = None
    out: Path | None = None
    progress: bool = True
    latency: bool = False  # time prompt + greedy decode against dense, interleaved
    latency_prompt: int = 64
    latency_tokens: int = 16
    latency_repeats: int = 3


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


FOLD_SUFFIX = "+fold"


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


def _pruned_copy(dense: Any, plan: PruningPlan, stats: ActivationStats, kind: str) -> nn.Module:
    """A pruned copy of ``dense`` with ``kind`` patches; ``'rotate+fold'`` also folds it."""
    model = copy.deepcopy(dense)
    base = kind.removesuffix(FOLD_SUFFIX)
    apply_plan(get_adapter(model), plan, fit_patches(stats, plan, base))
    if kind.endswith(FOLD_SUFFIX):
        fold_model(model)
    return model


def run_sweep(cfg: SweepConfig, extra: Evaluator | None = None) -> dict[str, Any]:
    """Calibrate once, then evaluate dense and every (n, patch) point; writes sweep.json/png."""
    started = time.perf_counter()
    loaded = load_model(cfg.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(dense)
    windows = calibration_windows(tokenizer, cfg.calib, cfg.samples, cfg.seqlen, cfg.seed)
    stats = collect_stats(adapter, windows, progress=cfg.progress)
    ppl_windows = (
        eval_windows(tokenizer, cfg.ppl, cfg.ppl_seqlen, cfg.ppl_limit) if cfg.ppl else None
    )
    t0 = time.perf_counter()
    baseline = _evaluate(dense, ppl_windows, extra, tokenizer, cfg.progress, "dense")
    if cfg.latency:
        baseline.update(gen_time_ratio=1.0, flop_ratio=1.0)
    points: list[SweepPoint] = []
    for n in cfg.prune:
        plan = select(stats, len(adapter.layers), n, cfg.select)
        for kind in cfg.patches:
            t = time.perf_counter()
            model = _pruned_copy(dense, plan, stats, kind)
            metrics = _evaluate(model, ppl_windows, extra, tokenizer, cfg.progress, f"n={n} {kind}")
            if cfg.latency:
                metrics.update(latency_metrics(dense, model, cfg))
            points.append(
                SweepPoint(
                    n,
                    kind,
                    plan.removed,
                    plan.scores.get("similarity"),
                    len(plan.kept),
                    metrics,
                    round(time.perf_counter() - t, 1),
                )
            )
            del model
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "num_layers": len(adapter.layers),
        "baseline": {"metrics": baseline, "seconds": round(time.perf_counter() - t0, 1)},
        "points": [asdict(p) for p in points],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cfg.out is not None:
        write_sweep(result, Path(cfg.out))
    return result


def write_sweep(result: dict[str, Any], out: Path) -> None:
    """``sweep.json`` and ``sweep.png`` (one panel per metric) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_sweep(result, out / "sweep.png")


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
