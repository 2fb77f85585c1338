"""A random Llama-architecture model above ONNX's 2 GB protobuf limit: save, export to ONNX
with external data (``model.onnx`` + ``model.onnx.data``), validate, run with ONNX Runtime.

``python -m lp_deploy.benchmarks.big_export --out DIR [--optimize N]`` prints one JSON line:
sizes, the export's seconds and peak RSS (measured in a child process), the validation
figures and the ONNX Runtime runtime's greedy tokens compared with PyTorch's.

The model is built once into ``DIR/model`` (atomically; ``DIR/model.READY`` marks it
complete) and reused by later runs and by other measurements: it is never deleted here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lp_deploy.errors import LpDeployError

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
PROMPT = "The history of the river valley begins with the first farming villages"


def ready_marker(model_dir: Path) -> Path:
    """The empty file beside ``model_dir`` that says the model is complete and loadable."""
    return model_dir.with_name(f"{model_dir.name}.READY")


def build(out: Path, tokenizer_source: str, config: dict[str, Any] | None = None) -> None:
    """Save a seeded random Llama with ``tokenizer_source``'s tokenizer into ``out``
    (written beside it and renamed into place), then write its ready marker."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lp_deploy.atomic import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    llama = LlamaConfig(vocab_size=len(tokenizer), **(config or CONFIG))
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(llama).eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    ready_marker(out).touch()


def ensure_model(
    out: Path, tokenizer_source: str, config: dict[str, Any] | None = None
) -> tuple[int, float | None]:
    """(fp32 bytes of the weights, build seconds or None when an existing model was reused).

    A complete model (ready marker present) with the same config is reused; one with another
    config is refused rather than replaced, since other measurements may be reading it."""
    config = config or CONFIG
    built_s = None
    if ready_marker(out).is_file():
        saved = json.loads((out / "config.json").read_text())
        differ = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if differ:
            raise LpDeployError(
                f"{out} holds another model (saved vs wanted: {differ}); choose another --out "
                f"or delete {out} and {ready_marker(out)}"
            )
    else:
        t0 = time.perf_counter()
        build(out, tokenizer_source, config)
        built_s = round(time.perf_counter() - t0, 1)
    return weight_bytes(out), built_s


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the saved weights (element count x element size, from the headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = f.get_slice(key)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                total += count * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4}


def _export_child(model: str, out: str, optimize: str) -> None:
    """Run in a child process: export + validate, then print the report and peak RSS."""
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx

    cfg = OnnxExportConfig(model=model, out=Path(out), overwrite=True, optimize=int(optimize))
    result = export_onnx(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"report": _report(result.report), "peak_rss_mb": round(peak)}))


def _report(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(report)
    keys = ("external_data", "onnx_bytes", "seconds", "fusions", "validation")
    return {k: data[k] for k in keys}


def export(model_dir: Path, export_dir: Path, optimize: int = 0) -> dict[str, Any]:
    """Export + validate ``model_dir`` in a child process (so that its peak RSS is the
    export's own); the child's report, peak RSS and the files written."""
    cmd = [sys.executable, "-m", "lp_deploy.benchmarks.big_export", "--out", "-"]
    child = subprocess.run(
        [*cmd, "--child", str(model_dir), str(export_dir), str(optimize)],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise LpDeployError(f"the export failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    exported: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    exported["files"] = {p.name: p.stat().st_size for p in sorted(export_dir.iterdir())}
    return exported


def run_ort(export_dir: Path, model_dir: Path, tokens: int = 8) -> dict[str, Any]:
    """Greedy tokens from the ONNX Runtime runtime and from PyTorch on the same prompt."""
    from lp_deploy.runtimes import create_runtime

    t0 = time.perf_counter()
    ort = create_runtime("onnxruntime", export_dir)
    got = ort.generate(PROMPT, max_new_tokens=tokens, stop_token_ids=[])
    ort_s = time.perf_counter() - t0
    del ort
    want = create_runtime("torch", model_dir).generate(
        PROMPT, max_new_tokens=tokens, stop_token_ids=[]
    )
    return {
        "ort_tokens_equal_torch": got == want,
        "tokens": tokens,
        "ort_load_and_generate_s": round(ort_s, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work directory (~7 GB)")
    parser.add_argument("--tokenizer", default=None, help="default: smollm2-135m's")
    parser.add_argument("--optimize", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _export_child(*args.child)
        return
    from lp_deploy.sources import alias_dir

    model_dir = args.out / "model"
    export_dir = args.out / ("onnx" if args.optimize == 0 else f"onnx-opt{args.optimize}")
    tokenizer = args.tokenizer or str(alias_dir("smollm2-135m"))
    model_bytes, build_s = ensure_model(model_dir, tokenizer)
    result = {
        "model_bytes_fp32": model_bytes,
        "build_and_save_s": build_s,
        "optimize": args.optimize,
        "export": export(model_dir, export_dir, args.optimize),
        "ort": run_ort(export_dir, model_dir),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
