"""Runtimes behind one interface: PyTorch, ONNX Runtime, TensorRT.

``create_runtime(name, artifact_dir, **opts)`` builds one by name:

- ``torch``: a patched checkpoint dir or any dense model source (alias, model dir, gguf,
  hub id); options ``dtype``, ``device``, ``compile``, ``threads``, ``padding_side``.
- ``onnxruntime`` (alias ``ort``): a directory written by ``lp-deploy export onnx``; options
  ``providers``, ``intra_op_num_threads`` (or ``threads``), ``dtype``, ``io_binding``,
  ``graph_optimization_level``, ``padding_side``.
- ``tensorrt``: the same ONNX export run by ONNX Runtime's TensorRT execution provider
  (needs TensorRT and onnxruntime-gpu on an NVIDIA GPU machine).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lp_deploy.errors import LpDeployError

from .base import BaseRuntime, Past, Runtime

__all__ = [
    "RUNTIMES",
    "BaseRuntime",
    "Past",
    "Runtime",
    "create_runtime",
    "unavailable_reason",
]


def _torch(artifact: Path, **opts: Any) -> BaseRuntime:
    from .torch_runtime import TorchRuntime

    return TorchRuntime.from_artifact(artifact, **opts)


def _ort_opts(opts: dict[str, Any]) -> dict[str, Any]:
    threads = opts.pop("threads", None)
    if threads and not opts.get("intra_op_num_threads"):
        opts["intra_op_num_threads"] = threads
    return opts


def _onnxruntime(artifact: Path, **opts: Any) -> BaseRuntime:
    from .ort_runtime import OrtRuntime

    return OrtRuntime(artifact, **_ort_opts(opts))


def unavailable_reason(name: str) -> str | None:
    """Why runtime ``name`` cannot run on this machine (e.g. TensorRT missing), else None."""
    if name in ("torch", "onnxruntime", "ort"):
        return None
    from .ort_runtime import TENSORRT, import_ort

    providers = import_ort().get_available_providers()
    if TENSORRT not in providers:
        return (
            "TensorRT is not installed: pip install tensorrt onnxruntime-gpu on a machine with "
            f"an NVIDIA GPU (this onnxruntime offers {', '.join(providers)})"
        )
    return None


def _tensorrt(artifact: Path, **opts: Any) -> BaseRuntime:
    from .ort_runtime import CPU, CUDA, TENSORRT, OrtRuntime

    reason = unavailable_reason("tensorrt")
    if reason:
        raise LpDeployError(reason)
    opts.setdefault("providers", [TENSORRT, CUDA, CPU])
    return OrtRuntime(artifact, **_ort_opts(opts))


RUNTIMES: dict[str, Callable[..., BaseRuntime]] = {
    "torch": _torch,
    "onnxruntime": _onnxruntime,
    "ort": _onnxruntime,
    "tensorrt": _tensorrt,
}


def create_runtime(name: str, artifact_dir: str | Path, **opts: Any) -> BaseRuntime:
    """The runtime ``name`` over ``artifact_dir``; a clear error for an unknown name."""
    factory = RUNTIMES.get(name)
    if factory is None:
        raise LpDeployError(
            f"unknown runtime {name!r}; choose one of: torch, onnxruntime, tensorrt"
        )
    return factory(Path(artifact_dir), **opts)
