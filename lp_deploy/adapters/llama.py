"""Adapter for Llama and the architectures that share its shape."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lp_deploy.adapters.base import LayerAdapter, ModelAdapter, Projection
from lp_deploy.modules import unwrap


class LlamaLayerAdapter(LayerAdapter):
    """Pre-norm layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    @property
    def attn_norm(self) -> nn.Module | None:
        return self.layer.input_layernorm

    @property
    def mlp_norm(self) -> nn.Module | None:
        return self.layer.post_attention_layernorm

    @property
    def attn_inputs(self) -> Sequence[Projection]:
        attn = self.layer.self_attn
        return (attn.q_proj, attn.k_proj, attn.v_proj)

    @property
    def attn_output(self) -> Projection:
        return self.layer.self_attn.o_proj

    @property
    def mlp_inputs(self) -> Sequence[Projection]:
        mlp = self.layer.mlp
        return (mlp.gate_proj, mlp.up_proj)

    @property
    def mlp_output(self) -> Projection:
        return self.layer.mlp.down_proj

    def set_layer_index(self, index: int) -> None:
        self.layer.self_attn.layer_idx = index


class LlamaAdapter(ModelAdapter):
    """``LlamaForCausalLM``: ``model.embed_tokens``, ``model.layers``, ``model.norm``."""

    model_types = ("llama",)

    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def set_layers(self, layers: Sequence[nn.Module]) -> None:
        self.model.model.layers = nn.ModuleList(layers)
        config = self.config
        config.num_hidden_layers = len(layers)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            # The types of the layers that remain, in their new order.
            config.layer_types = [
                getattr(unwrap(layer).self_attn, "layer_type", None) or "full_attention"
                for layer in layers
            ]

    @property
    def embeddings(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def set_final_norm(self, module: nn.Module) -> None:
        self.model.model.norm = module

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        return LlamaLayerAdapter(unwrap(layer))
