"""PyTorch runtime: the eager Hugging Face model (optionally ``torch.compile``-d)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.loading import load_model

from .base import Runtime, eos_ids, parse_dtype
from .batching import Past


def full_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty ``DynamicCache`` that keeps every past token on every layer.

    Sliding-window layers get a full layer too: their window is applied by the attention
    mask (built from ``config.sliding_window`` for them), so logits are the same as with a
    cropped cache, and every layer's past has one layout, ``total_sequence_length`` long,
    matching the attention mask -- the layout of the ONNX graph's flat past.
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [
        DynamicLayer() if getattr(layer, "is_sliding", False) else layer for layer in cache.layers
    ]
    return cache


def kv_cache(model: PreTrainedModel, past: Past | None) -> DynamicCache:
    """A :func:`full_cache` holding ``past`` (empty for ``None``)."""
    cache = full_cache(model)
    for i, (key, value) in enumerate(past or []):
        cache.update(key, value, i)
    return cache


def cache_tensors(cache: Any) -> Past:
    """Per-layer ``(key, value)`` of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class TorchRuntime(Runtime):
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
        loaded = load_model(artifact, parse_dtype(dtype, "torch"))
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
