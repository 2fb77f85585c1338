"""What ``distill`` trains: each installed patch as a trainable module, and back.

``full``: every patch's whole d x d matrix (a per-channel ``ScalePatch`` starts as its
diagonal matrix). ``diag``: a rotate patch ``P = H diag(s) H^T`` trains only ``s`` (it still
folds to a per-channel multiply); a ``ScalePatch`` trains its scale.
"""

from __future__ import annotations

import torch
from torch import nn

from lp_deploy.adapters import ModelAdapter
from lp_deploy.errors import LpDeployError
from lp_deploy.hadamard import hadamard_matrix, is_supported
from lp_deploy.modules import HadamardScalePatch, LinearPatch, ScalePatch
from lp_deploy.prune import installed_patches, set_patch

TRAIN_MODES = ("full", "diag")
#: relative off-diagonal energy of ``H^T P H`` above which a patch is not a rotate patch
OFF_DIAGONAL_TOL = 1e-4


def _weight(patch: nn.Module) -> torch.Tensor:
    if not isinstance(patch, LinearPatch):
        raise TypeError(f"unknown patch module {type(patch).__name__}")
    return patch.weight.data


def _to_diag(patch: nn.Module, d: int) -> nn.Module:
    if isinstance(patch, ScalePatch):
        return ScalePatch(patch.scale.data.float())
    if not is_supported(d):
        raise LpDeployError(f"--train diag needs a Hadamard matrix of size {d}; use --train full")
    h = hadamard_matrix(d, dtype=torch.float64)
    rotated = h.T @ _weight(patch).double() @ h
    diag = torch.diagonal(rotated)
    off = (rotated - torch.diag(diag)).norm() / rotated.norm().clamp_min(1e-300)
    if off > OFF_DIAGONAL_TOL:
        raise LpDeployError(
            f"the patch is not diagonal in the Hadamard basis (off-diagonal {float(off):.1e}): "
            "it was trained with --train full or is not a rotate patch; use --train full"
        )
    return HadamardScalePatch(diag.float(), h.float())


def _to_full(patch: nn.Module) -> nn.Module:
    if isinstance(patch, ScalePatch):
        return LinearPatch(torch.diag(patch.scale.data.float()))
    return LinearPatch(_weight(patch).float())


def check_mode(adapter: ModelAdapter, mode: str) -> None:
    """Errors :func:`make_trainable` would raise, before any work."""
    if mode not in TRAIN_MODES:
        raise LpDeployError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    if mode == "diag":
        for patch in installed_patches(adapter).values():
            _to_diag(patch, adapter.hidden_size)


def make_trainable(adapter: ModelAdapter, mode: str) -> dict[int, nn.Parameter]:
    """Freeze the model, install trainable patches (float32); their parameters by position."""
    check_mode(adapter, mode)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    params: dict[int, nn.Parameter] = {}
    device = next(adapter.model.parameters()).device
    for pos, patch in sorted(installed_patches(adapter).items()):
        new = _to_diag(patch, adapter.hidden_size) if mode == "diag" else _to_full(patch)
        new = new.to(device)
        set_patch(adapter, pos, new)
        param = next(new.parameters())
        param.requires_grad_(True)
        params[pos] = param
    return params


def _exported(patch: nn.Module, dtype: torch.dtype) -> nn.Module:
    if isinstance(patch, HadamardScalePatch):
        return LinearPatch(patch.matrix().to(dtype))
    if isinstance(patch, ScalePatch):
        return ScalePatch(patch.scale.data.to(dtype))
    if isinstance(patch, LinearPatch):
        return LinearPatch(patch.weight.data.to(dtype))
    raise TypeError(f"unknown patch module {type(patch).__name__}")


def export_patches(adapter: ModelAdapter, dtype: torch.dtype) -> None:
    """Replace the trainable patches by the checkpoint's patch types, frozen, in ``dtype``."""
    for pos, patch in installed_patches(adapter).items():
        set_patch(adapter, pos, _exported(patch, dtype).to(next(patch.parameters()).device))
