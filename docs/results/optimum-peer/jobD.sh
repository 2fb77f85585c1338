#!/bin/bash
# issue 11 acceptance 5, second run: + lp-deploy's dense fp32 export with --optimize (ORT fusions:
# RMSNorm fused as in optimum's graph); optimum vs lp fp32 vs lp fp32 --optimize vs lp int8
set -uo pipefail
cd /work/wt-distill
git log --oneline -1
export LP_DEPLOY_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
M=/work/artifacts/measure
date -u
[ -f $M/dense-fp32-opt/model.onnx ] || /usr/bin/time -v .venv/bin/lp-deploy -q export onnx smollm2-135m --optimize --out $M/dense-fp32-opt 2>&1 | grep -E "Elapsed|Maximum resident|wrote|rror|valid"
python3 -c "import json; e=json.load(open('$M/dense-fp32-opt/export.json')); print(json.dumps({k: e.get(k) for k in ('optimize','fusions','onnx_bytes')}), json.dumps({k: e['validation'].get(k) for k in ('prefill_logits','decode_logits','passed')}))"
.venv/bin/python - <<'PY'
import collections, onnx
g = onnx.load("/work/artifacts/measure/dense-fp32-opt/model.onnx", load_external_data=False).graph
c = collections.Counter(n.op_type for n in g.node); print("stored nodes", sum(c.values()), dict(c.most_common()))
PY
date -u
rm -rf $M/bench-optimum2
.venv/bin/lp-deploy -q bench --baseline $M/optimum-dense --candidate /work/artifacts/quant/dense-fp32 --candidate $M/dense-fp32-opt --candidate /work/artifacts/lead/dense-int8 \
  --runtime onnxruntime --latency --prompt-lengths 128 --decode-tokens 32 --repeats 30 --warmup 2 --threads 1 --out $M/bench-optimum2 2>&1 | tail -3
sed -n '/## Latency/,/## Environment/p' $M/bench-optimum2/report.md
date -u
echo DONE
