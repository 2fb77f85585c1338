#!/bin/bash
# issue 11 acceptance 5: optimum-cli export of the dense model dir (compat env), logits and graph
# checks, then prefill(128)/decode latency: optimum vs lp-deploy fp32 vs lp-deploy int8, interleaved
set -uo pipefail
cd /work/wt-distill
git log --oneline -1
export LP_DEPLOY_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
M=/work/artifacts/measure; DENSE=/root/.cache/lp_deploy/models/smollm2-135m-b179c9523d0e
C=/work/wt-quant/.venv-compat/bin/python
date -u
$C -c "import optimum, transformers, onnxruntime; print('compat: transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
$C -m pip list 2>/dev/null | grep -i -E "^optimum"
.venv/bin/python -c "import torch; g=torch.Generator().manual_seed(0); import json; print(json.dumps(torch.randint(100, 40000, (2, 16), generator=g).tolist()))" > $M/ids16.json
if [ ! -f $M/optimum-dense/model.onnx ]; then
  rm -rf $M/optimum-dense
  /usr/bin/time -v $C tests/compat/check_transformers4.py $DENSE $M/ids16.json --onnx-out $M/optimum-dense > $M/t4.json 2> $M/optimum-export.err
  grep -E "Elapsed|Maximum resident" $M/optimum-export.err; tail -3 $M/optimum-export.err | grep -v "^\s" 
fi
[ -f $M/optimum-dense/tokenizer.json ] || { echo "optimum wrote no tokenizer: copying the model dir's"; cp $DENSE/tokenizer*.json $M/optimum-dense/; }
ls -la $M/optimum-dense; du -sb $M/optimum-dense
date -u
.venv/bin/python $M/check_optimum.py $DENSE $M/optimum-dense /work/artifacts/quant/dense-fp32 /work/artifacts/lead/dense-int8 $M/t4.json $M/ids16.json
date -u
rm -rf $M/bench-optimum
.venv/bin/lp-deploy -q bench --baseline $M/optimum-dense --candidate /work/artifacts/quant/dense-fp32 --candidate /work/artifacts/lead/dense-int8 \
  --runtime onnxruntime --latency --prompt-lengths 128 --decode-tokens 32 --repeats 30 --warmup 2 --threads 1 --out $M/bench-optimum 2>&1 | tail -5
sed -n '/## Latency/,/## Environment/p' $M/bench-optimum/report.md
date -u
echo DONE
