"""Peak memory of one (model, runtime), measured in a fresh process.

``python -m lp_deploy.benchmarks.memory --runtime torch --artifact DIR`` loads the runtime,
runs one prefill and a few decode steps, and prints one JSON line: the RSS before loading
(interpreter and libraries), the peak RSS (``VmHWM``; ``ru_maxrss`` too, which Linux seeds
with the parent's peak at spawn), and on CUDA the peak allocated GPU memory. A fresh
process per case keeps models from polluting each other's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1024 * 1024


def ru_maxrss_mb() -> float:
    """``ru_maxrss`` in MB (KiB on Linux). Linux carries the parent's high-water mark over
    ``fork``/``exec`` into the child's, so in a spawned process it can be the parent's."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / MB


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space (``VmHWM``), else
    ``ru_maxrss``."""
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else ru_maxrss_mb()


def current_rss_mb() -> float:
    """Resident set size now (``VmRSS``), else the peak so far."""
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else peak_rss_mb()


def _preimport(runtime: str) -> None:
    """Import the runtime's libraries first, so they count before the model does."""
    import importlib

    module = "torch_runtime" if runtime == "torch" else "ort_runtime"
    names = [f"lp_deploy.runtimes.{module}", "transformers.models.auto.modeling_auto"]
    if runtime != "torch":
        names.append("onnxruntime")
    for name in names:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _workload(rt: Any, prompt_length: int, decode_tokens: int, batch_size: int) -> None:
    """One prefill of random ids, then greedy single-token steps with the KV cache."""
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = max(2, min(len(rt.tokenizer), 1 << 30))
    ids = torch.randint(0, vocab, (batch_size, prompt_length), generator=gen)
    mask = torch.ones(batch_size, prompt_length, dtype=torch.long)
    pos = torch.arange(prompt_length).expand(batch_size, -1)
    logits, past = rt.forward(ids, mask, pos, None)
    for k in range(decode_tokens):
        n = prompt_length + k
        token = logits[:, -1].argmax(-1, keepdim=True).cpu()
        mask = torch.ones(batch_size, n + 1, dtype=torch.long)
        logits, past = rt.forward(token, mask, torch.full((batch_size, 1), n), past)


def measure_here(
    runtime: str,
    artifact: str,
    prompt_length: int = 128,
    decode_tokens: int = 4,
    batch_size: int = 1,
    opts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load and run in this process; the numbers are only clean in a fresh one."""
    import torch

    from lp_deploy.runtimes import create_runtime

    _preimport(runtime)
    before = current_rss_mb()
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    rt = create_runtime(runtime, artifact, **(opts or {}))
    loaded = current_rss_mb()
    _workload(rt, prompt_length, decode_tokens, batch_size)
    if on_cuda:
        torch.cuda.synchronize()
    result: dict[str, Any] = {
        "runtime": runtime,
        "artifact": artifact,
        "prompt_length": prompt_length,
        "decode_tokens": decode_tokens,
        "batch_size": batch_size,
        "rss_before_load_mb": round(before, 1),  # interpreter and libraries
        "rss_after_load_mb": round(loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1) if on_cuda else None,
    }
    result["model_rss_mb"] = round(max(0.0, result["peak_rss_mb"] - before), 1)
    return result


def measure_subprocess(
    runtime: str,
    artifact: str | Path,
    prompt_length: int = 128,
    decode_tokens: int = 4,
    batch_size: int = 1,
    opts: dict[str, Any] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """:func:`measure_here` in a fresh ``python -m lp_deploy.benchmarks.memory`` process.

    Returns ``{"error": ...}`` instead of raising when the child fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "lp_deploy.benchmarks.memory",
        "--runtime",
        runtime,
        "--artifact",
        str(artifact),
        "--prompt-length",
        str(prompt_length),
        "--decode-tokens",
        str(decode_tokens),
        "--batch-size",
        str(batch_size),
        "--opts",
        json.dumps(opts or {}),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lp_deploy.benchmarks.memory", description=__doc__)
    p.add_argument("--runtime", required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--opts", default="{}", help="runtime options as a JSON object")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line with the measurements."""
    args = _parse(argv)
    result = measure_here(
        args.runtime,
        args.artifact,
        args.prompt_length,
        args.decode_tokens,
        args.batch_size,
        json.loads(args.opts),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
