#!/bin/bash
# issue 11 acceptance 5, third run (repeatability): the same four exports, 40 rounds
set -uo pipefail
cd /work/wt-distill
export LP_DEPLOY_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
M=/work/artifacts/measure
date -u; uptime
rm -rf $M/bench-optimum3
.venv/bin/lp-deploy -q bench --baseline $M/optimum-dense --candidate /work/artifacts/quant/dense-fp32 --candidate $M/dense-fp32-opt --candidate /work/artifacts/lead/dense-int8 \
  --runtime onnxruntime --latency --prompt-lengths 128 --decode-tokens 32 --repeats 40 --warmup 2 --threads 1 --out $M/bench-optimum3 2>&1 | tail -3
sed -n '/## Latency/,/## Environment/p' $M/bench-optimum3/report.md
date -u; uptime
echo DONE
