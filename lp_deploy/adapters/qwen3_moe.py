"""Adapter for Qwen3-MoE (Qwen3's attention, a routed mixture of experts as the MLP)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lp_deploy.adapters.base import LayerAdapter, Projection, WeightView
from lp_deploy.adapters.llama import LlamaAdapter, LlamaLayerAdapter
from lp_deploy.modules import unwrap


def is_sparse(layer: nn.Module) -> bool:
    """Whether a decoder layer's MLP is a routed mixture of experts."""
    return hasattr(unwrap(layer).mlp, "experts")


class Qwen3MoeLayerAdapter(LlamaLayerAdapter):
    """The router (``mlp.gate``, a ``(experts, d)`` weight) reads the MLP norm's output like
    any projection; so does every expert's ``gate_up_proj`` (one ``(experts, 2 * inter, d)``
    tensor) and every expert's ``down_proj`` (``(experts, d, inter)``) writes the stream.
    Layers listed in ``mlp_only_layers`` keep a dense MLP (Llama's names)."""

    @property
    def mlp_inputs(self) -> Sequence[Projection]:
        mlp = self.layer.mlp
        if not is_sparse(self.layer):
            return super().mlp_inputs
        return (mlp.gate, WeightView(mlp.experts, "gate_up_proj"))

    @property
    def mlp_output(self) -> Projection:
        if not is_sparse(self.layer):
            return super().mlp_output
        return WeightView(self.layer.mlp.experts, "down_proj")


class Qwen3MoeAdapter(LlamaAdapter):
    """``Qwen3MoeForCausalLM``: which layers are sparse is recomputed from the config when a
    checkpoint is loaded, so pruning rewrites ``mlp_only_layers`` to the kept layers' new
    indices (and ``decoder_sparse_step`` to 1)."""

    model_types = ("qwen3_moe",)

    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        return Qwen3MoeLayerAdapter(unwrap(layer))

    def set_layers(self, layers: Sequence[nn.Module]) -> None:
        super().set_layers(layers)
        self.config.mlp_only_layers = [i for i, layer in enumerate(layers) if not is_sparse(layer)]
        self.config.decoder_sparse_step = 1
