"""The per-architecture adapter interface the generic passes are written against.

A :class:`ModelAdapter` exposes where a decoder-only model keeps its embeddings,
decoder layers, final norm and lm_head; a :class:`LayerAdapter` exposes, for one
decoder layer, the norms that read the residual stream and the projections that
read from / write to it. Passes (statistics, pruning, folding) never name an
architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class LayerAdapter(ABC):
    """View of one decoder layer."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer: Any = layer

    @property
    @abstractmethod
    def attn_norm(self) -> nn.Module:
        """Norm applied to the stream before attention."""

    @property
    @abstractmethod
    def mlp_norm(self) -> nn.Module:
        """Norm applied to the stream before the MLP."""

    @property
    @abstractmethod
    def attn_inputs(self) -> Sequence[nn.Linear]:
        """Projections that read the attention norm's output (q, k, v)."""

    @property
    @abstractmethod
    def attn_output(self) -> nn.Linear:
        """Projection that writes attention's result to the stream (o_proj)."""

    @property
    @abstractmethod
    def mlp_inputs(self) -> Sequence[nn.Linear]:
        """Projections that read the MLP norm's output (gate, up)."""

    @property
    @abstractmethod
    def mlp_output(self) -> nn.Linear:
        """Projection that writes the MLP's result to the stream (down_proj)."""

    @abstractmethod
    def set_layer_index(self, index: int) -> None:
        """Renumber the layer (its KV-cache slot) after layers were deleted."""


class ModelAdapter(ABC):
    """View of a causal LM; one subclass per architecture family."""

    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()
    #: Why the residual stream cannot be rotated/folded exactly, or None when it can.
    fold_blocker: str | None = None

    def __init__(self, model: PreTrainedModel) -> None:
        self.model: Any = model

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The decoder stack without the lm_head (returns hidden states)."""

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def set_layers(self, layers: Sequence[nn.Module]) -> None:
        """Replace the decoder layers and update the config to match."""

    @property
    @abstractmethod
    def embeddings(self) -> nn.Embedding:
        """Token embedding table (writes the stream)."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """Norm before the lm_head."""

    @abstractmethod
    def set_final_norm(self, module: nn.Module) -> None:
        """Replace the final norm (used to place a patch before it)."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Linear:
        """Output projection (reads the final norm's output)."""

    @abstractmethod
    def layer_adapter(self, layer: nn.Module) -> LayerAdapter:
        """Adapter for one decoder layer (unwraps lp-deploy wrappers)."""

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embeddings.weight
