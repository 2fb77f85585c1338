"""Quantization variants (ONNX Runtime's quantizers called directly) of one fp32 export:
perplexity on 8 x 512 validation windows, greedy agreement, size.

``python qexp.py FP32_EXPORT OUT nbits-bits=8-acc=4,hqq-lmh=fp32,int8dyn,...``
"""

import json
import math
import sys
import time
from pathlib import Path

import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as mq
from transformers import AutoTokenizer

from lp_deploy.exporters import quantize as Q
from lp_deploy.exporters.onnx import validation_ids

src_dir = Path(sys.argv[1])
out = Path(sys.argv[2])
variants = sys.argv[3].split(",")
src = src_dir / "model.onnx"
tok = AutoTokenizer.from_pretrained(src_dir)
ids, _ = validation_ids(tok, None, 8 * 512)
windows = ids.reshape(8, 512)
weights = Q.matmul_weights(Q._load(src))


def excl(pats):
    return sorted(Q.excluded_nodes(weights, pats))


ref = Q.ort_logits_fn(src)
ref_logits = [ref(w[None]) for w in windows]
ref_nll = sum(Q.window_nll(lg, w[None])[0] for lg, w in zip(ref_logits, windows, strict=False))
count = sum(Q.window_nll(lg, w[None])[1] for lg, w in zip(ref_logits, windows, strict=False))
ref_ppl = math.exp(ref_nll / count)
print(f"fp32 ppl {ref_ppl:.3f}", flush=True)


def run(name):
    parts = name.split("-")
    kind = parts[0]
    opts = dict(p.split("=") for p in parts[1:])
    ex = excl(["lm_head"] if opts.get("lmh") == "fp32" else [])
    dst = out / name
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Q.quiet_quantizers():
        model = onnx.load(str(src))
        bs = int(opts.get("bs", 32))
        acc = int(opts.get("acc", 0))
        bits = int(opts.get("bits", 4))
        sym = opts.get("sym", "0") == "1"
        if kind == "nbits":
            cfg = mq.DefaultWeightOnlyQuantConfig(
                block_size=bs, is_symmetric=sym, accuracy_level=acc, bits=bits
            )
        elif kind == "hqq":
            cfg = mq.HQQWeightOnlyQuantConfig(block_size=bs, bits=bits)
        elif kind == "kq":
            cfg = mq.KQuantWeightOnlyQuantConfig()
        elif kind == "int8dyn":
            Q._quantize_dynamic(src, dst / "model.onnx", ex, False, opts.get("pc") == "1")
            cfg = None
        if cfg is not None:
            qz = mq.MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=bs,
                is_symmetric=sym,
                accuracy_level=acc,
                nodes_to_exclude=ex,
                algo_config=cfg,
            )
            qz.process()
            qz.model.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=False)
    tq = time.time() - t0
    fn = Q.ort_logits_fn(dst / "model.onnx")
    nll = 0.0
    agree = 0
    for lg, w in zip(ref_logits, windows, strict=False):
        g = fn(w[None])
        nll += Q.window_nll(g, w[None])[0]
        agree += int((lg[0, :-1].argmax(-1) == g[0, :-1].argmax(-1)).sum())
    ppl = math.exp(nll / count)
    size = sum(f.stat().st_size for f in dst.glob("model.onnx*")) / 1e6
    r = dict(
        name=name,
        ppl=round(ppl, 3),
        inc=round(100 * (ppl / ref_ppl - 1), 2),
        agree=round(100 * agree / count, 1),
        mb=round(size, 1),
        quant_s=round(tq, 1),
        quantized=Q.count_quantized(dst / "model.onnx"),
    )
    print(json.dumps(r), flush=True)


for v in variants:
    try:
        run(v)
    except Exception as e:
        print(f"{v}: FAILED {type(e).__name__}: {e}", flush=True)
