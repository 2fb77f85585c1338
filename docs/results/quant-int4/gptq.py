"""int4 GPTQ with ONNX Runtime's bundled ``neural_compressor.gptq_quantize`` on an fp32 export
(the online Hadamard MatMuls excluded through its weight_config); ppl on 8 x 512 validation
windows. ``python gptq.py FP32_EXPORT OUT N_SAMPLES SEQLEN GROUP [EXCLUDE ...]``."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.neural_compressor import gptq_quantize
from transformers import AutoTokenizer

from lp_deploy.exporters import quantize as Q
from lp_deploy.exporters.onnx import validation_ids

src_dir = Path(sys.argv[1])
dst = Path(sys.argv[2])
n = int(sys.argv[3])
seqlen = int(sys.argv[4])
gs = int(sys.argv[5])
extra = sys.argv[6:]
src = src_dir / "model.onnx"
tok = AutoTokenizer.from_pretrained(src_dir)
text = Path("/work/shared/data/wikitext-2/valid.txt").read_text()
ids = tok(text[:400000], return_tensors="np")["input_ids"][0]
model = onnx.load(str(src))
sess_inputs = [i for i in model.graph.input]
names = [i.name for i in sess_inputs]


def feeds():
    for k in range(n):
        w = ids[k * seqlen : (k + 1) * seqlen][None].astype(np.int64)
        d = {"input_ids": w, "attention_mask": np.ones_like(w)}
        if "position_ids" in names:
            d["position_ids"] = np.arange(seqlen, dtype=np.int64)[None]
        for i in sess_inputs:
            if i.name.startswith("past_key_values."):
                dims = i.type.tensor_type.shape.dim
                d[i.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
        yield d, None


weights = Q.matmul_weights(model)
ex = set(Q.excluded_nodes(weights, extra))
wc = {}
for node in model.graph.node:
    if node.op_type == "MatMul" and node.name in weights:
        wc[node.name] = (
            "fp32"
            if node.name in ex
            else {"bits": 4, "group_size": gs, "scheme": "asym", "algorithm": "GPTQ"}
        )
for node in model.graph.node:
    if node.op_type == "MatMul" and node.name not in wc:
        wc[node.name] = "fp32"
print(
    "quantize",
    sum(v != "fp32" for v in wc.values()),
    "exclude",
    sum(v == "fp32" for v in wc.values()),
    flush=True,
)
t0 = time.time()
with Q.quiet_quantizers():
    out = gptq_quantize(
        model,
        feeds(),
        weight_config=wc,
        num_bits=4,
        group_size=gs,
        scheme="asym",
        n_samples=-1,
        percdamp=0.01,
        blocksize=128,
        actorder=False,
        mse=False,
        perchannel=True,
        accuracy_level=0,
    )
print("gptq s", time.time() - t0, flush=True)
dst.mkdir(parents=True, exist_ok=True)
out.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=False)
print("quantized", Q.count_quantized(dst / "model.onnx"))

vids, _ = validation_ids(tok, None, 8 * 512)
r, q, a = Q.compare_on_text(
    Q.ort_logits_fn(src), Q.ort_logits_fn(dst / "model.onnx"), vids.reshape(8, 512)
)
print(
    json.dumps(
        dict(
            fp32=r,
            ppl=q,
            inc=100 * (q / r - 1),
            agree=a,
            mb=sum(f.stat().st_size for f in dst.glob("model.onnx*")) / 1e6,
        )
    ),
    flush=True,
)
