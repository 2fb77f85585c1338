"""Adapter for Phi-3 (Llama's shape with fused ``qkv_proj`` and ``gate_up_proj``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lp_deploy.adapters.base import LayerAdapter, Projection
from lp_deploy.adapters.llama import LlamaAdapter, LlamaLayerAdapter
from lp_deploy.modules import unwrap


class Phi3LayerAdapter(LlamaLayerAdapter):
    """One fused projection reads each norm: ``qkv_proj`` (q, k and v rows stacked) and
    ``gate_up_proj``; folding acts on their input dim, so the fusion needs no splitting."""

    @property
    def attn_inputs(self) -> Sequence[Projection]:
        return (self.layer.self_attn.qkv_proj,)

    @property
    def mlp_inputs(self) -> Sequence[Projection]:
        return (self.layer.mlp.gate_up_proj,)


class Phi3Adapter(LlamaAdapter):
    """``Phi3ForCausalLM``: same model-level names as Llama."""

    model_types = ("phi3",)

    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        return Phi3LayerAdapter(unwrap(layer))
