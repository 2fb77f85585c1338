"""QA scoring time with and without shared-context scoring, side by side in one process.

``python -m lp_deploy.benchmarks.qa_speed MODEL --runtime onnxruntime --limit 100`` scores the
first ``--limit`` examples of each task twice with the same runtime: ``plain`` (every request
whole, longest first, ``--batch-size`` at a time: the bench before shared-context scoring)
and ``shared`` (one forward pass of a multiple-choice item's context, its continuations
batched on the repeated KV cache: the bench's default). The order of the two alternates from
task to task so that drift on a shared machine hits both alike. Each task prints one JSON
line (seconds per mode, the ratio, the largest log-likelihood difference between the modes,
and each mode's time extrapolated to the whole task: seconds per example x examples in the
task); a last line sums them. Exits with 1 when the modes disagree by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lp_deploy.benchmarks.bench import parse_tasks
from lp_deploy.benchmarks.qa import load_task
from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Runtime, create_runtime

MODES = ("plain", "shared")


@dataclass(frozen=True)
class TaskSpeed:
    """One task's side-by-side timing (seconds per mode over ``n`` examples)."""

    task: str
    n: int
    full_n: int
    seconds: dict[str, float]
    full_seconds_estimate: dict[str, float]
    speedup: float
    max_abs_diff: float


def time_task(
    rt: Runtime,
    task: str,
    limit: int | None,
    batch_size: int,
    data_dir: Path | None = None,
    first: str = "plain",
) -> TaskSpeed:
    """Score ``task``'s first ``limit`` examples in both modes, ``first`` mode first."""
    examples = load_task(task, data_dir, limit)
    full_n = len(load_task(task, data_dir, None))
    pairs = [(r.context, r.continuation) for ex in examples for r in ex.requests]
    seconds: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for mode in (first, *(m for m in MODES if m != first)):
        start = time.perf_counter()
        out = rt.loglikelihood(pairs, batch_size, shared_context=mode == "shared")
        seconds[mode] = time.perf_counter() - start
        scores[mode] = [lp for lp, _ in out]
    diff = max(abs(a - b) for a, b in zip(scores["plain"], scores["shared"], strict=True))
    scale = full_n / len(examples)
    return TaskSpeed(
        task=task,
        n=len(examples),
        full_n=full_n,
        seconds=seconds,
        full_seconds_estimate={m: s * scale for m, s in seconds.items()},
        speedup=seconds["plain"] / seconds["shared"],
        max_abs_diff=diff,
    )


def total(rows: Sequence[TaskSpeed]) -> TaskSpeed:
    """Sums over tasks (``task="total"``): measured seconds and whole-set estimates, per mode."""
    measured = {m: sum(r.seconds[m] for r in rows) for m in MODES}
    return TaskSpeed(
        task="total",
        n=sum(r.n for r in rows),
        full_n=sum(r.full_n for r in rows),
        seconds=measured,
        full_seconds_estimate={m: sum(r.full_seconds_estimate[m] for r in rows) for m in MODES},
        speedup=measured["plain"] / measured["shared"],
        max_abs_diff=max(r.max_abs_diff for r in rows),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("model", help="an ONNX export (onnxruntime) or a model directory (torch)")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--tasks", default="all", help="'piqa,arc_easy,...' or 'all'")
    p.add_argument("--limit", type=int, default=100, help="first N examples per task")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--tol", type=float, default=1e-3, help="max |log-likelihood diff| allowed")
    args = p.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
    except LpDeployError as exc:
        p.error(str(exc))
    rt = create_runtime(args.runtime, args.model, threads=args.threads)
    rows = []
    for i, task in enumerate(tasks):
        row = time_task(rt, task, args.limit, args.batch_size, args.data_dir, MODES[i % 2])
        print(json.dumps(asdict(row)), flush=True)
        rows.append(row)
    summary = total(rows)
    print(json.dumps(asdict(summary)), flush=True)
    if summary.max_abs_diff > args.tol:
        print(
            f"plain and shared scoring differ by {summary.max_abs_diff:.3g} > --tol {args.tol}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
