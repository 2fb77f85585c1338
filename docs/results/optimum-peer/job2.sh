#!/bin/bash
# second run (repeatability, candidates in the other order): optimum vs lp-deploy old / new default fp32
set -uo pipefail
cd /work/wt-quant
export LP_DEPLOY_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
M=/work/artifacts/measure; R=/work/artifacts/rmsfuse
date -u; uptime
rm -rf $R/bench-optimum2
.venv/bin/lp-deploy -q bench --baseline $M/optimum-dense --candidate /work/artifacts/quant/dense-fp32 --candidate $R/dense-fp32 \
  --runtime onnxruntime --latency --prompt-lengths 128 --decode-tokens 32 --repeats 30 --warmup 2 --threads 1 --out $R/bench-optimum2 2>&1 | tail -3
sed -n '/## Latency/,/## Environment/p' $R/bench-optimum2/report.md
date -u; uptime
echo DONE
