"""Issue 11 acceptance 5, before timing: optimum's export of the dense SmolLM2 directory computes
the same logits as lp-deploy (transformers 5, PyTorch) and as lp-deploy's own fp32 export, and
what differs in the graphs (node counts by op type, as stored and after ONNX Runtime's
optimisation at the session options the bench uses).
usage: check_optimum.py DENSE_DIR OPTIMUM_DIR LP_FP32_DIR LP_INT8_DIR T4_JSON IDS_JSON"""

import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from lp_deploy.loading import load_model
from lp_deploy.runtimes.ort_runtime import OrtRuntime

dense_dir, opt_dir, lp_dir, int8_dir, t4_json, ids_json = sys.argv[1:7]
torch.set_num_threads(1)
model = load_model(dense_dir).model.eval()
# 1. transformers 4.57 (compat env) read the same directory: same logits?
t4 = json.loads(Path(t4_json).read_text())
ids16 = torch.tensor(json.loads(Path(ids_json).read_text()))
with torch.no_grad():
    t5 = model(input_ids=ids16).logits
print(
    json.dumps(
        {
            "transformers4_rope_theta": t4["rope_theta"],
            "transformers4_vs_5_max_abs": float((torch.tensor(t4["logits"]) - t5).abs().max()),
            "optimum_ORTModel_vs_transformers4_max_abs": t4.get("onnx_max_abs_diff"),
        }
    ),
    flush=True,
)
# 2. prefill 128 real tokens + 16 greedy KV-cache steps: each export vs PyTorch
tok = load_model(dense_dir).tokenizer
text = Path("/work/shared/data/wikitext-2/test.txt").read_text()[:4000]
ids = tok(text, return_tensors="pt").input_ids[:, :128]
with torch.no_grad():
    ref = model.generate(
        ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
ref_logits = torch.stack(ref.logits, 1)[0]  # 16 x V, decode logits (first = prefill's last)
with torch.no_grad():
    ref_prefill = model(input_ids=ids).logits[0]
for name, d in (("optimum", opt_dir), ("lp-deploy fp32", lp_dir)):
    rt = OrtRuntime(d, intra_op_num_threads=1)
    n = ids.shape[1]
    logits, past = rt.forward(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], None)
    pre = float((logits[0] - ref_prefill).abs().max())
    dec, agree = [], 0
    seq = ref.sequences[0]
    for k in range(1, 16):
        tokn = seq[n + k - 1 : n + k][None]
        logits, past = rt.forward(
            tokn, torch.ones(1, n + k, dtype=torch.long), torch.tensor([[n + k - 1]]), past
        )
        dec.append(float((logits[0, -1] - ref_logits[k]).abs().max()))
        agree += int(logits[0, -1].argmax() == ref_logits[k].argmax())
    print(
        json.dumps(
            {
                "export": name,
                "prefill128_max_abs": pre,
                "decode_max_abs": max(dec),
                "greedy_agreement": f"{agree}/15",
                "logit_scale": float(ref_prefill.abs().max()),
            }
        ),
        flush=True,
    )


# 3. graphs: op counts as stored and as ONNX Runtime runs them (1 thread, ORT_ENABLE_ALL)
def ops(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type for n in g.node), len(g.initializer)


for name, d in (("optimum", opt_dir), ("lp-deploy fp32", lp_dir), ("lp-deploy int8", int8_dir)):
    stored, inits = ops(Path(d) / "model.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(Path(d) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        run, _ = ops(Path(tmp) / "opt.onnx")
    g = onnx.load(str(Path(d) / "model.onnx"), load_external_data=False)
    print(
        json.dumps(
            {
                "export": name,
                "opset": [(o.domain, o.version) for o in g.opset_import],
                "inputs": [i.name for i in g.graph.input][:4],
                "outputs": [o.name for o in g.graph.output][:3],
                "initializers": inits,
                "stored_nodes": sum(stored.values()),
                "stored": dict(stored.most_common()),
                "ort_nodes": sum(run.values()),
                "ort": dict(run.most_common()),
            }
        ),
        flush=True,
    )
