"""Adapters for Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms, pre- and post-norms around
attention and the MLP, embeddings scaled by sqrt(d), soft-capped logits (Gemma 2), q/k
norms and a local/global layer pattern (Gemma 3)."""

from __future__ import annotations

import torch
from torch import nn

from lp_deploy.adapters.base import LayerAdapter
from lp_deploy.adapters.llama import LlamaAdapter, LlamaLayerAdapter
from lp_deploy.modules import unwrap


class GemmaLayerAdapter(LlamaLayerAdapter):
    """``x + post_attn_norm(attn(input_norm(x)))``, then
    ``x + post_ff_norm(mlp(pre_ff_norm(x)))``."""

    @property
    def mlp_norm(self) -> nn.Module:
        return self.layer.pre_feedforward_layernorm

    def set_layer_index(self, index: int) -> None:
        super().set_layer_index(index)
        self.layer.layer_idx = index


class Gemma2Adapter(LlamaAdapter):
    """``Gemma2ForCausalLM``. The embedding module multiplies by sqrt(d) itself (boundary 0
    carries it); each kept layer keeps its attention type (sliding window or global) and
    ``config.layer_types`` is rewritten to match (:meth:`LlamaAdapter.set_layers`)."""

    model_types = ("gemma2",)
    fold_blocker = (
        "Gemma normalises the attention and MLP outputs (post-norms) before they join the "
        "residual stream, and its RMSNorm scales by (1 + w): a rotation of the stream cannot "
        "pass through those norms, so the patch stays one explicit d x d MatMul"
    )

    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        return GemmaLayerAdapter(unwrap(layer))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Adapter(Gemma2Adapter):
    """``Gemma3ForCausalLM`` (text only, ``gemma3_text``): Gemma 2's structure plus per-head
    q/k norms (off the stream) and local layers with their own RoPE base."""

    model_types = ("gemma3_text",)
