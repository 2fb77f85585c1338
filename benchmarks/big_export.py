"""A random Llama-architecture model above ONNX's 2 GB protobuf limit: save, export to ONNX
with external data (``model.onnx`` + ``model.onnx.data``), validate, run with ONNX Runtime.

``python -m lp_deploy.benchmarks.big_export --out DIR`` prints one JSON line: sizes, the
export's seconds and peak RSS (measured in a child process), the validation figures and
the ONNX Runtime runtime's greedy tokens compared with PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: ~805M parameters, 3.2 GB in fp32: 9 layers of hidden 2048 / MLP 8192, vocab 49152, untied
CONFIG: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 9,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build(out: Path, tokenizer_source: str) -> int:
    """Save a seeded random Llama with ``tokenizer_source``'s tokenizer; returns its bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), **CONFIG)
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _export_child(model: str, out: str) -> None:
    """Run in a child process: export + validate, then print the report and peak RSS."""
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx

    result = export_onnx(OnnxExportConfig(model=model, out=Path(out), overwrite=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"report": _report(result.report), "peak_rss_mb": round(peak)}))


def _report(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(report)
    return {k: data[k] for k in ("external_data", "onnx_bytes", "seconds", "validation")}


def run_ort(export: Path, model_dir: Path, tokens: int = 8) -> dict[str, Any]:
    """Greedy tokens from the ONNX Runtime runtime and from PyTorch on the same prompt."""
    from lp_deploy.runtimes import create_runtime

    prompt = "The history of the river valley begins with the first farming villages"
    t0 = time.perf_counter()
    ort = create_runtime("onnxruntime", export)
    got = ort.generate(prompt, max_new_tokens=tokens, stop_token_ids=[])
    ort_s = time.perf_counter() - t0
    del ort
    want = create_runtime("torch", model_dir).generate(
        prompt, max_new_tokens=tokens, stop_token_ids=[]
    )
    return {"ort_tokens_equal_torch": got == want, "ort_load_and_generate_s": round(ort_s, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work directory (~7 GB)")
    parser.add_argument("--tokenizer", default=None, help="default: smollm2-135m's")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _export_child(*args.child)
        return
    from lp_deploy.sources import alias_dir

    model_dir, export = args.out / "model", args.out / "onnx"
    shutil.rmtree(model_dir, ignore_errors=True)
    t0 = time.perf_counter()
    model_bytes = build(model_dir, args.tokenizer or str(alias_dir("smollm2-135m")))
    build_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "lp_deploy.benchmarks.big_export", "--out", str(args.out)]
    child = subprocess.run(
        [*cmd, "--child", str(model_dir), str(export)], capture_output=True, text=True, check=True
    )
    exported = json.loads(child.stdout.strip().splitlines()[-1])
    files = {p.name: p.stat().st_size for p in export.glob("model.onnx*")}
    print(
        json.dumps(
            {
                "model_bytes_fp32": model_bytes,
                "build_and_save_s": round(build_s, 1),
                "export": exported,
                "onnx_files": files,
                "ort": run_ort(export, model_dir),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
