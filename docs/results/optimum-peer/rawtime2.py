"""As the bench does: prefill 128 ids then 32 decode steps feeding the presents back, through
lp-deploy's OrtRuntime (1 thread), models interleaved per round; median decode ms/step."""

import statistics
import time

import torch

from lp_deploy.runtimes.ort_runtime import OrtRuntime

M = {
    "optimum": "/work/artifacts/measure/optimum-dense",
    "lp-new": "/work/artifacts/rmsfuse/dense-fp32",
    "lp-old": "/work/artifacts/quant/dense-fp32",
}
R = {n: OrtRuntime(d, intra_op_num_threads=1) for n, d in M.items()}
ids = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
T = {n: [] for n in R}
Pf = {n: [] for n in R}
for _r in range(12):
    for n, rt in R.items():
        t0 = time.perf_counter()
        logits, past = rt.forward(
            ids, torch.ones(1, 128, dtype=torch.long), torch.arange(128)[None], None
        )
        Pf[n].append(time.perf_counter() - t0)
        tok = logits[:, -1:].argmax(-1)
        for k in range(32):
            L = 128 + k
            t0 = time.perf_counter()
            logits, past = rt.forward(
                tok, torch.ones(1, L + 1, dtype=torch.long), torch.tensor([[L]]), past
            )
            T[n].append(time.perf_counter() - t0)
            tok = logits[:, -1:].argmax(-1)
b = statistics.median(T["optimum"][32:])
bp = statistics.median(Pf["optimum"][1:])
for n in R:
    m = statistics.median(T[n][32:])
    p = statistics.median(Pf[n][1:])
    print(
        f"{n:8s} decode {m * 1e3:7.2f} ms/step ratio {m / b:.3f}   "
        f"prefill {p * 1e3:7.1f} ms ratio {p / bp:.3f}"
    )
