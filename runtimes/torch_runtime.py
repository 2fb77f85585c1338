"""PyTorch runtime: the eager Hugging Face model (optionally ``torch.compile``-d)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.checkpoint import config_meta, load_patched
from lp_deploy.errors import CheckpointError, ModelSourceError
from lp_deploy.loading import load_model

from .base import BaseRuntime, Past, eos_ids, parse_dtype

ONNX_FILE = "model.onnx"


@dataclass
class LoadedSource:
    """A model to run or export: dense or patched, with its ``lp_deploy`` metadata."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def _config_meta(path: Path) -> dict[str, Any] | None:
    try:
        return config_meta(path)
    except CheckpointError as exc:
        raise ModelSourceError(str(exc)) from exc


def load_source(source: str | Path, dtype: torch.dtype | None = None) -> LoadedSource:
    """A patched checkpoint dir (``lp_deploy`` section with a plan) or any ``load_model`` source."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / ONNX_FILE).is_file():
        raise ModelSourceError(
            f"{path} is an ONNX export (model.onnx), not PyTorch weights; run it with the "
            "onnxruntime runtime, or point at the checkpoint it was exported from"
        )
    meta = _config_meta(path) if path.is_dir() else None
    if meta is not None and "plan" in meta:
        patched = load_patched(path, dtype=dtype)
        return LoadedSource(patched.model, patched.tokenizer, patched.meta, {"kind": "patched"})
    try:
        loaded = load_model(str(source), dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelSourceError):
            raise
        raise ModelSourceError(f"cannot load a model from {str(source)!r}: {exc}") from exc
    return LoadedSource(loaded.model, loaded.tokenizer, {}, dict(loaded.source))


def kv_cache(model: PreTrainedModel, past: Past | None) -> DynamicCache:
    """A ``DynamicCache`` holding ``past`` (empty for ``None``)."""
    cache = DynamicCache(config=model.config)
    for i, (key, value) in enumerate(past or []):
        cache.update(key, value, i)
    return cache


def cache_tensors(cache: Any) -> Past:
    """Per-layer ``(key, value)`` of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class TorchRuntime(BaseRuntime):
    """Eager PyTorch on ``device``; ``compile=True`` wraps the model in ``torch.compile``."""

    name = "torch"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device = "cpu",
        compile: bool = False,
        threads: int | None = None,
        padding_side: str = "right",
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model: PreTrainedModel = cast(Any, model).to(self.device).eval()
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.eos_token_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
        self._call: Any = torch.compile(self.model, dynamic=True) if compile else self.model

    @classmethod
    def from_artifact(
        cls,
        artifact: str | Path,
        dtype: str | torch.dtype | None = None,
        **opts: Any,
    ) -> TorchRuntime:
        """From a patched checkpoint dir or a dense source (alias, model dir, gguf, hub id)."""
        torch_dtype = parse_dtype(dtype, "torch")
        loaded = load_source(artifact, torch_dtype)
        return cls(loaded.model, loaded.tokenizer, **opts)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None = None,
    ) -> tuple[torch.Tensor, Past]:
        dev = self.device
        cache = kv_cache(self.model, [(k.to(dev), v.to(dev)) for k, v in past] if past else None)
        with torch.inference_mode():
            out = self._call(
                input_ids=input_ids.to(dev),
                attention_mask=attention_mask.to(dev),
                position_ids=position_ids.to(dev),
                past_key_values=cache,
                use_cache=True,
            )
        return out.logits.float(), cache_tensors(out.past_key_values)
