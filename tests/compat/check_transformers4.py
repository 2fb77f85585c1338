"""Read an lp-deploy-written model directory with transformers 4.x (and optimum-onnx).

Runs in the compat environment (transformers 4.57 + optimum-onnx), not the project venv:

    .venv-compat/bin/python tests/compat/check_transformers4.py MODEL_DIR IDS.json \
        [--onnx-out DIR]

Prints one JSON line: the transformers-4 logits of the ids in ``IDS.json`` (nested lists), the
``rope_theta`` transformers 4 read, and with ``--onnx-out`` the max |logit diff| between an
``optimum-cli export onnx --task text-generation-with-past`` of the directory (run in ONNX
Runtime through optimum's ORTModelForCausalLM) and transformers 4's PyTorch logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("ids")
    parser.add_argument("--onnx-out", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.tensor(json.loads(Path(args.ids).read_text()))
    config = AutoConfig.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    result = {"rope_theta": getattr(config, "rope_theta", None), "logits": logits.tolist()}
    if args.onnx_out:
        result["onnx_max_abs_diff"] = _optimum_diff(args.model_dir, args.onnx_out, ids, logits)
    print(json.dumps(result))
    return 0


def _optimum_diff(model_dir: str, out: str, ids: object, logits: object) -> float:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    cli = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(cli), "export", "onnx", "--model", model_dir]
    cmd += ["--task", "text-generation-with-past", out]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"optimum-cli failed: {done.stderr[-2000:]}")
    ort = ORTModelForCausalLM.from_pretrained(out, provider="CPUExecutionProvider", use_cache=True)
    assert isinstance(ids, torch.Tensor) and isinstance(logits, torch.Tensor)
    got = ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return float((got - logits).abs().max())


if __name__ == "__main__":
    sys.exit(main())
