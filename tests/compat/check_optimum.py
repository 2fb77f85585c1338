"""Load an lp-deploy ONNX export with optimum's ORTModelForCausalLM and generate greedily.

Runs in the compat environment (transformers 4.57 + optimum-onnx), not the project venv:

    .venv-compat/bin/python tests/compat/check_optimum.py EXPORT_DIR --prompt-ids 1,2,3 \
        --max-new-tokens 32 --expected 4,5,6

Prints one JSON line ``{"tokens": [...], "match": true|false|null}``; exits 1 on a mismatch.
Prompt and expected output are token ids: the two transformers versions tokenise differently.
"""

from __future__ import annotations

import argparse
import json
import sys


def _ids(text: str | None) -> list[int] | None:
    return None if text is None else [int(t) for t in text.split(",") if t.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("export_dir")
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--expected", default=None)
    args = parser.parse_args()

    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(
        args.export_dir, provider="CPUExecutionProvider", use_cache=True, use_io_binding=False
    )
    prompt = torch.tensor([_ids(args.prompt_ids)])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
    )
    tokens = out[0, prompt.shape[1] :].tolist()
    expected = _ids(args.expected)
    match = None if expected is None else tokens == expected
    print(json.dumps({"tokens": tokens, "match": match}))
    return 1 if match is False else 0


if __name__ == "__main__":
    sys.exit(main())
