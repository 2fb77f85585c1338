"""Adapter for Granite (Llama's shape plus four scalar multipliers)."""

from __future__ import annotations

import torch

from lp_deploy.adapters.llama import LlamaAdapter


class GraniteAdapter(LlamaAdapter):
    """``GraniteForCausalLM``: the embeddings are multiplied by ``embedding_multiplier``
    (inside the backbone, so boundary 0 already carries it), every layer's writes by
    ``residual_multiplier`` before they join the stream, attention scores by
    ``attention_multiplier`` (inside attention), and the logits divided by
    ``logits_scaling``. Scalars commute with a rotation of the stream: the fold is exact."""

    model_types = ("granite",)

    @property
    def residual_multiplier(self) -> float:
        return float(self.config.residual_multiplier)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(hidden) / float(self.config.logits_scaling)
