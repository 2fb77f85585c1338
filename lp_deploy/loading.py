"""Load any model source into a :class:`~lp_deploy.model.LoadedModel`.

One entry point, :func:`load_model`, for every stage and runtime: a built-in alias, a GGUF
file, a Hugging Face model directory or hub id, or a pruned checkpoint written by
``lp-deploy patch`` / ``fold`` (its patches reinstalled). ONNX exports and reports are
refused with a pointer to what reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lp_deploy.artifacts import Kind, inspect_artifact
from lp_deploy.checkpoint import load_patched
from lp_deploy.errors import ModelSourceError
from lp_deploy.model import LoadedModel
from lp_deploy.sources import load_dense

_NOT_WEIGHTS = {
    Kind.ONNX: "an ONNX export (model.onnx), not PyTorch weights; run it with the onnxruntime "
    "runtime, or point at the checkpoint it was exported from",
    Kind.REPORT: "an 'lp-deploy bench' report, not a model",
    Kind.SWEEP: "an 'lp-deploy sweep' result, not a model",
}


def load_model(
    source: str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """The model and tokenizer behind ``source``, in eval mode.

    ``dtype`` None: float32 for dense sources, the saved dtype for pruned checkpoints.
    ``device_map`` (dense sources): handed to transformers/accelerate (``"auto"`` spreads
    the weights over the GPUs, then the CPU).
    """
    artifact = inspect_artifact(source)
    if artifact.kind in _NOT_WEIGHTS:
        raise ModelSourceError(f"{artifact.location} is {_NOT_WEIGHTS[artifact.kind]}")
    if artifact.kind == Kind.CHECKPOINT:
        if device_map is not None:
            raise ModelSourceError(
                f"{artifact.location} is a pruned checkpoint; --device-map applies to dense "
                "model sources only"
            )
        return load_patched(artifact.path, dtype)
    return load_dense(artifact, dtype or torch.float32, trust_remote_code, device_map)
