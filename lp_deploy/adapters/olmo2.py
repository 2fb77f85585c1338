"""Adapter for OLMo 2 (norms after attention and the MLP, q/k norms, no pre-norms)."""

from __future__ import annotations

from torch import nn

from lp_deploy.adapters.base import LayerAdapter
from lp_deploy.adapters.llama import LlamaAdapter, LlamaLayerAdapter
from lp_deploy.modules import unwrap


class Olmo2LayerAdapter(LlamaLayerAdapter):
    """``x + post_attn_norm(attn(x))``, then ``x + post_ff_norm(mlp(x))``: q/k/v and
    gate/up read the stream itself; o_proj and down_proj write it through a norm."""

    @property
    def attn_norm(self) -> nn.Module | None:
        return None

    @property
    def mlp_norm(self) -> nn.Module | None:
        return None


class Olmo2Adapter(LlamaAdapter):
    """``Olmo2ForCausalLM``: q_norm/k_norm act on the whole q/k projections, off the stream."""

    model_types = ("olmo2",)
    fold_blocker = (
        "OLMo 2 normalises the attention and MLP outputs (post-norms) before they join the "
        "residual stream, so a rotation of the stream cannot pass through those norms; the "
        "patch stays one explicit d x d MatMul"
    )

    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        return Olmo2LayerAdapter(unwrap(layer))
