"""Architecture adapters; :func:`get_adapter` picks one by ``config.model_type``."""

from __future__ import annotations

from transformers import PreTrainedModel

from lp_deploy.adapters.base import LayerAdapter, ModelAdapter, Projection, WeightView
from lp_deploy.adapters.gemma import Gemma2Adapter, Gemma3Adapter
from lp_deploy.adapters.granite import GraniteAdapter
from lp_deploy.adapters.llama import LlamaAdapter
from lp_deploy.adapters.mistral import MistralAdapter
from lp_deploy.adapters.olmo2 import Olmo2Adapter
from lp_deploy.adapters.phi3 import Phi3Adapter
from lp_deploy.adapters.qwen2 import Qwen2Adapter
from lp_deploy.adapters.qwen3 import Qwen3Adapter
from lp_deploy.adapters.qwen3_moe import Qwen3MoeAdapter
from lp_deploy.errors import UnsupportedArchitectureError

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    Phi3Adapter,
    GraniteAdapter,
    Olmo2Adapter,
    Gemma2Adapter,
    Gemma3Adapter,
    Qwen3MoeAdapter,
)


def supported_model_types() -> list[str]:
    """Every ``model_type`` with an adapter."""
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``; raises :class:`UnsupportedArchitectureError` when none fits."""
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
        f"supported model types: {', '.join(supported_model_types())}. "
        "Add an adapter in lp_deploy/adapters/ (see LlamaAdapter) to support it."
    )


__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "ModelAdapter",
    "Projection",
    "WeightView",
    "get_adapter",
    "supported_model_types",
]
