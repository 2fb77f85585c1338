"""The per-architecture adapter interface the generic passes are written against.

A :class:`ModelAdapter` exposes where a decoder-only model keeps its embeddings,
decoder layers, final norm and lm_head; a :class:`LayerAdapter` exposes, for one
decoder layer, the norms that read the residual stream and the projections that
read from / write to it. Passes (statistics, pruning, folding) never name an
architecture.

A projection is anything with a ``weight`` whose last dim reads the stream (readers) or
whose dim -2 writes it (writers), and an optional ``bias``: an ``nn.Linear``, a router
module, or a :class:`WeightView` of a 3-D expert tensor ``(experts, out, in)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class WeightView:
    """One parameter of ``module`` seen as a projection (e.g. all experts' ``gate_up_proj``
    stacked as ``(experts, 2 * inter, d)``); ``module`` is what receives its input."""

    bias: torch.Tensor | None = None

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    @property
    def weight(self) -> nn.Parameter:
        param = getattr(self.module, self.name)
        assert isinstance(param, nn.Parameter)
        return param


class Projection(Protocol):
    """What reads or writes the stream: an ``nn.Linear``, a module with a ``weight`` (a
    router), a :class:`WeightView`."""

    @property
    def weight(self) -> torch.Tensor: ...


def reading_module(proj: Projection) -> nn.Module:
    """The module whose input is the projection's input."""
    return proj.module if isinstance(proj, WeightView) else cast(nn.Module, proj)


class LayerAdapter(ABC):
    """View of one decoder layer."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer: Any = layer

    @property
    @abstractmethod
    def attn_norm(self) -> nn.Module | None:
        """Norm applied to the stream before attention; None: attention reads the stream
        itself (no pre-norm, e.g. OLMo 2)."""

    @property
    @abstractmethod
    def mlp_norm(self) -> nn.Module | None:
        """Norm applied to the stream before the MLP; None: the MLP reads the stream itself."""

    @property
    @abstractmethod
    def attn_inputs(self) -> Sequence[Projection]:
        """Projections that read the attention norm's output (q, k, v or a fused qkv)."""

    @property
    @abstractmethod
    def attn_output(self) -> Projection:
        """Projection that writes attention's result to the stream (o_proj)."""

    @property
    @abstractmethod
    def mlp_inputs(self) -> Sequence[Projection]:
        """Projections that read the MLP norm's output (gate, up; a router and its experts)."""

    @property
    @abstractmethod
    def mlp_output(self) -> Projection:
        """Projection that writes the MLP's result to the stream (down_proj; the experts')."""

    @abstractmethod
    def set_layer_index(self, index: int) -> None:
        """Renumber the layer (its KV-cache slot) after layers were deleted."""


class ModelAdapter(ABC):
    """View of a causal LM; one subclass per architecture family."""

    #: ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...] = ()
    #: Why the residual stream cannot be rotated/folded exactly, or None when it can.
    fold_blocker: str | None = None

    @property
    def residual_multiplier(self) -> float:
        """Factor on each layer's writes before they are added to the stream (Granite)."""
        return 1.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the backbone's output (lm_head plus any scaling or
        soft-capping the family applies)."""
        out: torch.Tensor = self.lm_head(hidden)
        return out

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
