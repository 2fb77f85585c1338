"""The one loaded-model type every stage passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.adapters import ModelAdapter, get_adapter


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer.

    ``meta`` is the ``lp_deploy`` section of a pruned checkpoint (source model, plan, patch,
    calibration, fold record; empty for a dense model); ``source`` says where the weights came
    from (kind, location, sha256s).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.model)

    @property
    def is_pruned(self) -> bool:
        return "plan" in self.meta
