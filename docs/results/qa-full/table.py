"""Markdown tables from one or more ``lp-deploy bench`` reports (the same models, tasks split
across reports): accuracy with standard error, and paired differences on the same questions.

    python docs/results/qa-full/table.py REPORT_DIR [REPORT_DIR ...] --ref onnx-none \
        [--rename old=new ...] [--metric acc|acc_norm]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lp_deploy.benchmarks.qa import Metric, TaskResult, paired_differences


def load(reports: list[Path], runtime: str) -> dict[str, dict[str, TaskResult]]:
    """Per model, per task: the task results of every report (a task twice is an error)."""
    merged: dict[str, dict[str, TaskResult]] = {}
    for report in reports:
        data = json.loads((report / "report.json").read_text())
        for name, entry in data["runtimes"][runtime]["models"].items():
            for task, res in (entry.get("tasks") or {}).items():
                tasks = merged.setdefault(name, {})
                if task in tasks:
                    raise SystemExit(f"{name}: task {task} in more than one report")
                tasks[task] = TaskResult(**res)
    return merged


def _acc(res: TaskResult, metric: Metric) -> tuple[float, float]:
    if metric == "acc_norm" and res.acc_norm is not None and res.acc_norm_stderr is not None:
        return res.acc_norm, res.acc_norm_stderr
    return res.acc, res.acc_stderr


def accuracy_table(
    results: dict[str, dict[str, TaskResult]], names: dict[str, str], metric: Metric
) -> str:
    tasks = list(next(iter(results.values())))
    head = (
        "| model | "
        + " | ".join(f"{t} (n={results[next(iter(results))][t].n})" for t in tasks)
        + " | mean of tasks |"
    )
    rows = [head, "|---" * (len(tasks) + 2) + "|"]
    for name, res in results.items():
        values = [_acc(res[t], metric) for t in tasks]
        cells = [f"{acc:.4f} ± {se:.4f}" for acc, se in values]
        mean = sum(acc for acc, _ in values) / len(values)
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + f" | {mean:.4f} |")
    return "\n".join(rows)


def paired_table(
    results: dict[str, dict[str, TaskResult]], ref: str, names: dict[str, str], metric: Metric
) -> str:
    tasks = [*next(iter(results.values())), "all"]
    rows = [
        "| model - " + names.get(ref, ref) + " | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, res in results.items():
        if name == ref:
            continue
        diffs = paired_differences(res, results[ref], metric)
        cells = [
            f"{100 * diffs[t].diff:+.2f} ± {100 * diffs[t].stderr:.2f}"
            + ("*" if diffs[t].significant else "")
            for t in tasks
        ]
        rows.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--ref", action="append", default=[], help="paired differences against it")
    p.add_argument("--rename", action="append", default=[], help="old=new display name")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    p.add_argument("--only", default=None, help="comma-separated models to keep, in order")
    args = p.parse_args()
    names = dict(r.split("=", 1) for r in args.rename)
    results: dict[str, Any] = load(args.reports, args.runtime)
    if args.only:
        results = {m: results[m] for m in args.only.split(",")}
    print(f"Accuracy ({args.metric}, ± standard error):\n")
    print(accuracy_table(results, names, args.metric))
    for ref in args.ref:
        print(f"\nPaired difference in points ({args.metric}, same questions; * beyond 1.96 SE):\n")
        print(paired_table(results, ref, names, args.metric))


if __name__ == "__main__":
    main()
