"""Perplexity of pruned + patched SmolLM2-135M for given prune counts and patch kinds.

usage: ppl_points.py N KIND[,KIND...] [N KINDS ...]
Cosine selection; calibration: the defaults (32 x 512 tokens of wikitext-2 valid.txt, seed 0);
perplexity: the first 195 512-token windows of wikitext-2 test.txt. One JSON line per point.
"""

import json
import sys
import time

import torch

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.loading import load_model
from lp_deploy.perplexity import PerplexitySpec, model_perplexity
from lp_deploy.pipeline import calibrate

torch.set_num_threads(1)
args = sys.argv[1:]
jobs = [(int(args[i]), args[i + 1].split(",")) for i in range(0, len(args), 2)]
t0 = time.perf_counter()
dense = load_model("smollm2-135m")
cal = calibrate(dense, CalibrationSpec(), progress=False)
windows = PerplexitySpec(limit=195).windows(dense.tokenizer)
head = {"calibration_s": round(time.perf_counter() - t0, 1), "windows": list(windows.shape)}
print(json.dumps(head), flush=True)
for n, kinds in jobs:
    plan = cal.plan(n, "cosine")
    for kind in kinds:
        t = time.perf_counter()
        pruned = cal.prune(plan, kind)
        fit_s = time.perf_counter() - t
        ppl = model_perplexity(pruned.model, windows, progress=False)
        point = {
            "n": n,
            "removed": plan.removed,
            "kind": kind,
            "ppl": round(ppl, 3),
            "fit_s": round(fit_s, 1),
            "total_s": round(time.perf_counter() - t, 1),
            "patch": pruned.meta["patch"],
        }
        print(json.dumps(point), flush=True)
        del pruned
