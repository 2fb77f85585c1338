"""Why block-wise int4 loses more on a rotated model: the same round-to-nearest int4 (block 32
along the input dimension, asymmetric, like ONNX Runtime's MatMulNBits quantizer) applied in
PyTorch to chosen projections of an lp-deploy model, perplexity on the first 4 x 512 tokens of
wikitext-2 test. No ONNX Runtime involved: if the gap shows here, it is the weights' math, not
the kernel.

    OMP_NUM_THREADS=1 python docs/results/quant-int4/fake_quant.py MODEL \
        proj,q_proj+k_proj+v_proj,o_proj,gate_proj+up_proj,down_proj [--block 32]

MODEL: an alias or checkpoint (``smollm2-135m``, ``lp-deploy fold --online-hadamard`` output).
Each comma-separated group is quantized alone (``+`` joins names); ``lm_head`` and the online
Hadamard transforms stay fp32.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from lp_deploy.data import data_file
from lp_deploy.loading import load_model
from lp_deploy.perplexity import window_nll


def rtn(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Round-to-nearest, asymmetric (range includes 0), blocks along the input dim."""
    rows, cols = w.shape
    b = w.reshape(rows, cols // block, block)
    lo = b.amin(-1, keepdim=True).clamp_max(0)
    hi = b.amax(-1, keepdim=True).clamp_min(0)
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(b / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("groups")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    loaded = load_model(args.model, torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    text = data_file("wikitext-2/test.txt").read_text()
    ids = tok(text[:100_000], return_tensors="pt").input_ids[0][: 4 * 512].reshape(4, 512)

    def perplexity() -> float:
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in ids:
                total, count = window_nll(model(w[None]).logits, w[None])
                nll, n = nll + total, n + count
        return math.exp(nll / n)

    base = perplexity()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for group in args.groups.split(","):
        model.load_state_dict(original)
        names = [
            name
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and "hadamard" not in name
            and name != "lm_head"
            and any(p in name for p in group.split("+"))
        ]
        with torch.no_grad():
            for name in names:
                weight = model.get_submodule(name).weight
                weight.copy_(rtn(weight.double(), args.bits, args.block).float())
        ppl = perplexity()
        print(
            f"{os.path.basename(str(args.model)):14s} {group:24s} {len(names):3d} linears: "
            f"perplexity {base:.3f} -> {ppl:.3f} ({100 * (ppl / base - 1):+.1f}%)",
            flush=True,
        )


if __name__ == "__main__":
    main()
