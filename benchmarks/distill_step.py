"""Time one distillation step with the prefix cache (patch -> logits of the top-k ids) against
the same step through the whole model (full-vocabulary logits), and compare their losses.

``python -m lp_deploy.benchmarks.distill_step CHECKPOINT [--data F] [--seqlen N] [--repeats R]``
(one thread: ``OMP_NUM_THREADS=1``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import load_patched
from lp_deploy.loading import load_model
from lp_deploy.prefix import (
    first_patch_position,
    full_model_loss,
    prefix_hidden,
    suffix_hidden,
    topk_kl,
    topk_logits,
)
from lp_deploy.teacher import distill_windows, teacher_topk
from lp_deploy.trainable import make_trainable


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, float]:
    """Median wall and CPU seconds of forward + backward, and the loss."""
    walls, cpus, loss = [], [], 0.0
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        out.backward()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        loss = float(out.detach())
    return statistics.median(walls), statistics.median(cpus), loss


def measure(checkpoint: str, data: str, seqlen: int, k: int, repeats: int) -> dict[str, Any]:
    student = load_patched(checkpoint)
    dense = load_model(student.meta["source"]["source"])
    ids = distill_windows(student.tokenizer, CalibrationSpec(data, 1, seqlen, 0))
    target = teacher_topk(dense.model, ids[0], k)
    del dense
    top, probs = target["ids"].long()[None], target["probs"].float()[None]
    make_trainable(student.adapter, "full")
    pos = first_patch_position(student.adapter)
    prefix = prefix_hidden(student.adapter, ids, pos)
    adapter = student.adapter

    def cached() -> torch.Tensor:
        return topk_kl(topk_logits(adapter, suffix_hidden(adapter, prefix, pos), top), probs)

    def full() -> torch.Tensor:
        return full_model_loss(student.model, ids, top, probs)

    t_cached, c_cached, l_cached = _timed(cached, repeats)
    t_full, c_full, l_full = _timed(full, repeats)
    return {
        "seqlen": seqlen,
        "k": k,
        "threads": torch.get_num_threads(),
        "step_wall_s_prefix_cached": round(t_cached, 3),
        "step_wall_s_full_model": round(t_full, 3),
        "step_cpu_s_prefix_cached": round(c_cached, 3),
        "step_cpu_s_full_model": round(c_full, 3),
        "speedup_cpu": round(c_full / c_cached, 2),
        "loss_prefix_cached": l_cached,
        "loss_full_model": l_full,
        "loss_abs_diff": abs(l_cached - l_full),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="wikitext-2/valid.txt")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.checkpoint, args.data, args.seqlen, args.topk, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
