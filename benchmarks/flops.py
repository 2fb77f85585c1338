"""Forward FLOPs per token from the model config and its actual parameter shapes.

Counted: ``2 x weights`` of every linear layer (``lm_head`` included, even when tied to the
embeddings), the patch (a ``d x d`` MatMul: ``2 d^2``; a per-channel Mul: ``d``), and the
attention scores and weighted values: ``4 x layers x context x heads x head_dim`` for one
query attending to ``context`` keys. Norms, rotary embeddings, activations, softmax and
residual adds are ignored (they are a few percent at most).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_deploy.artifacts import CONFIG_FILE, META_KEY
from lp_deploy.modules import LinearPatch, ScalePatch


@dataclass(frozen=True)
class FlopProfile:
    """Per-token forward FLOPs of one model: a fixed part and a part per attended key."""

    linear: int  # all linear layers and patch ops, per token
    attention: int  # 4 x layers x heads x head_dim: per token per key attended to
    params: int
    layers: int

    def per_token(self, context: int) -> int:
        """FLOPs of one token that attends to ``context`` keys (itself included)."""
        return self.linear + self.attention * context

    def prefill(self, length: int) -> int:
        """FLOPs of a causal prefill of ``length`` tokens (token ``i`` attends to ``i + 1``)."""
        return length * self.linear + self.attention * length * (length + 1) // 2

    def decode(self, past: int, steps: int) -> int:
        """FLOPs of ``steps`` single-token steps after a ``past``-token prompt."""
        return sum(self.per_token(past + k + 1) for k in range(steps))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _head_layout(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return int(config.num_hidden_layers), heads, int(head_dim)


def linear_flops(model: nn.Module) -> int:
    """``2 x weights`` of every ``nn.Linear`` and patch MatMul, plus ``d`` per patch Mul."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | LinearPatch):
            total += 2 * module.weight.numel()
        elif isinstance(module, ScalePatch):
            total += module.scale.numel()
    return total


def attention_flops(config: Any) -> int:
    """Score and value FLOPs per token per attended key: ``4 x layers x heads x head_dim``."""
    layers, heads, head_dim = _head_layout(config)
    return 4 * layers * heads * head_dim


def profile_model(model: nn.Module) -> FlopProfile:
    """FLOP profile of a loaded model (patches included); parameters shared count once."""
    params = sum(p.numel() for p in model.parameters())
    config: Any = getattr(model, "config")  # noqa: B009 - nn.Module types attributes loosely
    layers = int(config.num_hidden_layers)
    return FlopProfile(linear_flops(model), attention_flops(config), int(params), layers)


def _patch_cost(record: dict[str, Any], d: int) -> tuple[int, int]:
    """(FLOPs, parameters) of one patch record of the ``lp_deploy`` metadata."""
    return (2 * d * d, d * d) if record.get("type") == "weight" else (d, d)


def profile_config_dir(path: str | Path) -> FlopProfile:
    """FLOP profile from a directory's ``config.json`` (checkpoint or ONNX export).

    Builds the architecture on the meta device (shapes only, no weights) and adds the
    patches listed in the ``lp_deploy`` metadata.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = profile_model(skeleton)
    raw = json.loads((path / CONFIG_FILE).read_text())
    records = (raw.get(META_KEY) or {}).get("patches", [])
    costs = [_patch_cost(r, int(config.hidden_size)) for r in records]
    return FlopProfile(
        linear=base.linear + sum(c[0] for c in costs),
        attention=base.attention,
        params=base.params + sum(c[1] for c in costs),
        layers=base.layers,
    )


def flop_ratio(candidate: int, baseline: int) -> float:
    """Candidate / baseline FLOPs (the ideal speed-up ratio)."""
    return candidate / baseline
