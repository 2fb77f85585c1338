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


class OnlineHadamard(nn.Module):
    """``x -> x H`` with ``H = kron(A, B) / sqrt(d)`` the orthonormal Hadamard matrix of
    :func:`lp_deploy.hadamard.hadamard_matrix`: the last dim viewed as ``(K, M)``, then
    ``A^T X B`` (QuaRot's online transform; two small MatMuls in an exported graph, a
    ``K x K`` and an ``M x M`` one, instead of a ``d x d`` one). Buffers are rebuilt, not
    saved."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float32) -> None:
        from lp_deploy.hadamard import base_matrix, hadamard_factors, hadamard_matrix

        super().__init__()
        self.k, self.m = hadamard_factors(d)
        rows = base_matrix(self.k).to(torch.float64)
        cols = hadamard_matrix(self.m, dtype=torch.float64) * (self.m / d) ** 0.5
        self.rows_t: torch.Tensor
        self.cols: torch.Tensor
        self.register_buffer("rows_t", rows.T.contiguous().to(dtype), persistent=False)
        self.register_buffer("cols", cols.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *batch, d = x.shape
        y = torch.matmul(x.reshape(*batch, self.k, self.m), self.cols.to(x.dtype))
        if self.k > 1:
            y = torch.matmul(self.rows_t.to(x.dtype), y)
        return y.reshape(*batch, d)


class HadamardInputLinear(nn.Linear):
    """``x -> linear(x H)``: a projection whose weight holds ``W H`` (so ``x H (W H)^T =
    x W^T`` exactly); its state dict is a plain Linear's."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(0, 0, bias=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.online_hadamard = OnlineHadamard(linear.in_features, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.online_hadamard(x), self.weight, self.bias)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits under ``root`` (every place it is registered)."""
    found = False
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)
                found = True
    if not found:
        raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")
