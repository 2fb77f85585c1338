"""Tokens the shared-context scorer runs through the model for the 8 full task sets: context
tokens (one pass per item, or whole rows where nothing is shared) and continuation tokens as
batched (padded to the longest choice) and unpadded. Run from the repository root with
LP_DEPLOY_DATA_DIR set; reads an fp32 export only for its tokenizer.

    python docs/results/qa-full/qa_tokens.py FP32_EXPORT_DIR
"""

import sys

from lp_deploy.benchmarks.qa import TASKS, load_task
from lp_deploy.runtimes.ort_runtime import OrtRuntime

rt = OrtRuntime(sys.argv[1])
tot_all = tot_ctx = 0
for t in TASKS:
    ex = load_task(t)
    pairs = [rt.encode_pair(r.context, r.continuation) for e in ex for r in e.requests]
    groups = rt._context_groups(pairs)
    ctx = cont = raw = 0
    for g in groups:
        if len(g) < 2:
            ctx += len(pairs[g[0]][0]) + len(pairs[g[0]][1]) - 1  # whole row minus last
            continue
        ctx += len(pairs[g[0]][0])
        longest = max(len(pairs[i][1]) for i in g)
        cont += len(g) * (longest - 1) if longest > 1 else 0  # padded continuation batch
        raw += sum(max(len(pairs[i][1]) - 1, 0) for i in g)
    print(
        f"{t:14s} items {len(ex):6d} context tokens {ctx:9d} "
        f"continuation tokens (padded) {cont:9d} unpadded {raw:9d}",
        flush=True,
    )
    tot_all += ctx + cont
    tot_ctx += ctx
print("total tokens", tot_all, "of which context", tot_ctx)
