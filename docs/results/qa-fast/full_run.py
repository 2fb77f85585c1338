"""All 8 QA task sets, whole, for one model: wall time per task, scored the way
``lp-deploy bench --qa-workers N`` scores them (a ScoringPool of N processes, one thread each).

    python docs/results/qa-fast/full_run.py DENSE_ONNX --workers 2 --out full_run.jsonl

One JSON line per task (seconds, n, acc / acc_norm with standard errors, every question's
result), then a total line. The worker processes start before the clock does.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from lp_deploy.benchmarks.qa import TASKS, evaluate_task
from lp_deploy.benchmarks.qa_pool import ScoringPool


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("model", help="an lp-deploy ONNX export directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    lines = []
    with ScoringPool(args.runtime, args.model, args.workers, args.batch_size) as pool:
        list(pool.imap([[]] * args.workers))  # start (and load) the workers
        start = time.perf_counter()
        for task in TASKS:
            t = time.perf_counter()
            result = evaluate_task(task, pool, progress=False)
            seconds = round(time.perf_counter() - t, 1)
            lines.append({"task": task, "seconds": seconds, **asdict(result)})
            print(task, result.n, f"acc {result.acc:.4f} ± {result.acc_stderr:.4f}", f"{seconds} s")
        total = round(time.perf_counter() - start, 1)
    lines.append(
        {
            "task": "total",
            "seconds": total,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "model": str(args.model),
        }
    )
    print(f"all 8 tasks: {total} s ({total / 60:.1f} min)")
    args.out.write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
