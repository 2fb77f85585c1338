#!/bin/bash
# issue 11 acceptance 5: default fp32 export with RMSNorm's rsqrt as Sqrt -> Div (ORT fuses it at
# session load), then the interleaved latency comparison against optimum's export
set -uo pipefail
cd /work/wt-quant
git log --oneline -1; git diff --stat
export LP_DEPLOY_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
M=/work/artifacts/measure; R=/work/artifacts/rmsfuse
date -u; uptime
rm -rf $R/dense-fp32
/usr/bin/time -v .venv/bin/lp-deploy export onnx smollm2-135m --out $R/dense-fp32 2> $R/export.err | tail -5
grep -E "Elapsed|Maximum resident" $R/export.err
python3 -c "import json;r=json.load(open('$R/dense-fp32/export.json'));print(r['fusions'],r['seconds'],{k:r['validation'][k] for k in ('prefill_logits','decode_logits','padded_batch_logits','present_kv','passed')})"
.venv/bin/python - <<'PY'
import collections, onnx, onnxruntime as ort, tempfile
R = "/work/artifacts/rmsfuse"
for name, d in (("optimum", "/work/artifacts/measure/optimum-dense"), ("lp old", "/work/artifacts/quant/dense-fp32"), ("lp new", R + "/dense-fp32")):
    with tempfile.TemporaryDirectory() as t:
        o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
        o.optimized_model_filepath = t + "/m.onnx"
        ort.InferenceSession(d + "/model.onnx", o, providers=["CPUExecutionProvider"])
        c = collections.Counter(n.op_type for n in onnx.load(t + "/m.onnx", load_external_data=False).graph.node)
    print(name, "nodes run", sum(c.values()), {k: c[k] for k in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Sqrt", "Reciprocal", "Div", "Pow", "ReduceMean")}, flush=True)
PY
# wait for this helper's own test run to finish before timing
while ! grep -q "^RC=" /work/team/logs/rmsfuse-tests.log 2>/dev/null; do sleep 20; done
date -u; uptime
rm -rf $R/bench-optimum
.venv/bin/lp-deploy -q bench --baseline $M/optimum-dense --candidate $R/dense-fp32 --candidate /work/artifacts/quant/dense-fp32 --candidate $M/dense-fp32-opt \
  --runtime onnxruntime --latency --prompt-lengths 128 --decode-tokens 32 --repeats 30 --warmup 2 --threads 1 --out $R/bench-optimum 2>&1 | tail -3
sed -n '/## Latency/,/## Environment/p' $R/bench-optimum/report.md
date -u; uptime
echo DONE
