"""Runtimes behind one interface (:class:`Runtime`): PyTorch, ONNX Runtime, TensorRT.

This folder (``runtimes/`` in the repository) is installed as ``lp_deploy.runtimes``; runtimes
import only the core. :data:`RUNTIMES` is the registry every
consumer (CLI, bench, lm-eval adapter, serving) takes names from; ``create_runtime(name,
artifact, **opts)`` builds one:

- ``torch``: a pruned checkpoint or any dense model source (alias, model dir, gguf, hub id);
  options ``dtype``, ``device``, ``compile``, ``threads``, ``padding_side``.
- ``onnxruntime`` (alias ``ort``): a directory written by ``lp-deploy export onnx``; options
  ``providers``, ``intra_op_num_threads`` (or ``threads``), ``dtype``, ``io_binding``,
  ``graph_optimization_level``, ``padding_side``.
- ``tensorrt``: the same ONNX export run by ONNX Runtime's TensorRT execution provider
  (needs TensorRT and onnxruntime-gpu on an NVIDIA GPU machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lp_deploy.artifacts import Kind
from lp_deploy.errors import LpDeployError

from .base import Runtime
from .batching import Past

__all__ = [
    "RUNTIMES",
    "Past",
    "Runtime",
    "RuntimeSpec",
    "create_runtime",
    "runtime_spec",
    "unavailable_reason",
]


def _torch(artifact: Path, **opts: Any) -> Runtime:
    from .torch_runtime import TorchRuntime

    return TorchRuntime.from_artifact(artifact, **opts)


def _ort_opts(opts: dict[str, Any]) -> dict[str, Any]:
    threads = opts.pop("threads", None)
    if threads and not opts.get("intra_op_num_threads"):
        opts["intra_op_num_threads"] = threads
    return opts


def _onnxruntime(artifact: Path, **opts: Any) -> Runtime:
    from .ort_runtime import OrtRuntime

    return OrtRuntime(artifact, **_ort_opts(opts))


def _tensorrt_missing() -> str | None:
    from .ort_runtime import TENSORRT, import_ort

    providers = import_ort().get_available_providers()
    if TENSORRT not in providers:
        return (
            "TensorRT is not installed: pip install tensorrt onnxruntime-gpu on a machine with "
            f"an NVIDIA GPU (this onnxruntime offers {', '.join(providers)})"
        )
    return None


def _tensorrt(artifact: Path, **opts: Any) -> Runtime:
    from .ort_runtime import CPU, CUDA, TENSORRT, OrtRuntime

    reason = _tensorrt_missing()
    if reason:
        raise LpDeployError(reason)
    opts.setdefault("providers", [TENSORRT, CUDA, CPU])
    return OrtRuntime(artifact, **_ort_opts(opts))


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime: its name, other names, the artifact kind it runs, and how to build it."""

    name: str
    aliases: tuple[str, ...]
    artifact: Kind  # MODEL covers every PyTorch source (dense or pruned); ONNX: an export
    factory: Callable[..., Runtime]
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, else None

    @property
    def runs_onnx(self) -> bool:
        return self.artifact == Kind.ONNX


RUNTIMES: dict[str, RuntimeSpec] = {
    s.name: s
    for s in (
        RuntimeSpec("torch", ("pytorch",), Kind.MODEL, _torch),
        RuntimeSpec("onnxruntime", ("ort",), Kind.ONNX, _onnxruntime),
        RuntimeSpec("tensorrt", ("trt",), Kind.ONNX, _tensorrt, _tensorrt_missing),
    )
}


def runtime_spec(name: str) -> RuntimeSpec:
    """The runtime called ``name`` (or one of its aliases); a clear error otherwise."""
    for spec in RUNTIMES.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise LpDeployError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")


def unavailable_reason(name: str) -> str | None:
    """Why runtime ``name`` cannot run on this machine (e.g. TensorRT missing), else None."""
    return runtime_spec(name).missing()


def create_runtime(name: str, artifact_dir: str | Path, **opts: Any) -> Runtime:
    """The runtime ``name`` over ``artifact_dir``; a clear error for an unknown name."""
    return runtime_spec(name).factory(Path(artifact_dir), **opts)
