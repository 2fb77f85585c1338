"""The patch as plain PyTorch modules (exportable, no hooks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LinearPatch(nn.Module):
    """``x -> x @ weight``: the LinearPatch ``P = H diag(s) H^T`` (or any d x d matrix)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight)


class ScalePatch(nn.Module):
    """``x -> x * scale``: a per-channel patch (``diag``, or a rotate patch after folding)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


Patch = LinearPatch | ScalePatch


class PatchedInput(nn.Module):
    """Applies ``patch`` to the first argument of ``inner`` (a decoder layer or the final norm).

    Attribute look-ups that miss fall through to ``inner`` so that model code reading
    e.g. ``layer.attention_type`` keeps working.
    """

    def __init__(self, inner: nn.Module, patch: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.patch = patch

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.inner(self.patch(hidden_states), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = super().__getattr__("inner")
            return getattr(inner, name)


def unwrap(module: nn.Module) -> nn.Module:
    """The module a :class:`PatchedInput` wraps, or the module itself."""
    return module.inner if isinstance(module, PatchedInput) else module


def patch_of(module: nn.Module) -> nn.Module | None:
    """The patch a :class:`PatchedInput` applies, or None."""
    return module.patch if isinstance(module, PatchedInput) else None


class HadamardScalePatch(nn.Module):
    """``x -> x H diag(scale) H^T``: a rotate patch parametrised by its ``d`` scales in the
    Hadamard basis (what ``distill --train diag`` trains; it stays foldable to a per-channel
    multiply). ``hadamard`` is orthonormal and fixed."""

    def __init__(self, scale: torch.Tensor, hadamard: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone(), requires_grad=False)
        self.hadamard: torch.Tensor
        self.register_buffer("hadamard", hadamard.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hadamard.to(x.dtype)
        return torch.matmul(torch.matmul(x, h) * self.scale.to(x.dtype), h.T)

    def matrix(self) -> torch.Tensor:
        """``H diag(s) H^T`` in float64."""
        h = self.hadamard.double()
        return (h * self.scale.double()) @ h.T
