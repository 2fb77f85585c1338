"""Fit LinearPatch matrices from activation statistics (float64, cast once)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.hadamard import hadamard_matrix
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.selection import Gap, PruningPlan
from lp_deploy.stats import ActivationStats

_EPS = 1e-12
Patch = LinearPatch | ScalePatch


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(_EPS)


def diag_scales(stats: ActivationStats, gap: Gap) -> torch.Tensor:
    """``mean|x_out| / mean|x_in|`` per channel."""
    return _ratio(stats.abs_mean(gap.end), stats.abs_mean(gap.start))


def rotate_scales(stats: ActivationStats, gap: Gap) -> torch.Tensor:
    """``mean|x_out H| / mean|x_in H|`` per channel of the Hadamard basis."""
    return _ratio(stats.abs_rot_mean(gap.end), stats.abs_rot_mean(gap.start))


def rotate_matrix(scales: torch.Tensor) -> torch.Tensor:
    """``P = H diag(s) H^T`` in float64."""
    h = hadamard_matrix(scales.numel(), dtype=torch.float64)
    return (h * scales.to(torch.float64)) @ h.T


def _fit_rotate(stats: ActivationStats, gap: Gap, dtype: torch.dtype) -> Patch:
    return LinearPatch(rotate_matrix(rotate_scales(stats, gap)).to(dtype))


def _fit_diag(stats: ActivationStats, gap: Gap, dtype: torch.dtype) -> Patch:
    return ScalePatch(diag_scales(stats, gap).to(dtype))


@dataclass(frozen=True)
class PatchKind:
    """A way to bridge a gap: how it is fitted and what it needs."""

    name: str
    description: str
    fit: Callable[[ActivationStats, Gap, torch.dtype], Patch] | None  # None: no patch
    needs_hadamard: bool = False  # the hidden size must have a Hadamard matrix


#: every patch kind, by name (the CLI, the sweep and the bench take their choices from here)
PATCH_KINDS: dict[str, PatchKind] = {
    k.name: k
    for k in (
        PatchKind(
            "rotate",
            "LinearPatch P = H diag(s) H^T (one d x d MatMul; folds to a per-channel multiply)",
            _fit_rotate,
            needs_hadamard=True,
        ),
        PatchKind("diag", "per-channel scale s = mean|x_out| / mean|x_in|", _fit_diag),
        PatchKind("none", "no patch: the layers are just deleted", None),
    )
}


def patch_kind(name: str) -> PatchKind:
    """The registered kind ``name``; a clear error naming the choices otherwise."""
    if name not in PATCH_KINDS:
        raise LpDeployError(f"unknown patch kind {name!r}; choose one of {', '.join(PATCH_KINDS)}")
    return PATCH_KINDS[name]


def fit_patch(
    stats: ActivationStats, gap: Gap, kind: str, dtype: torch.dtype = torch.float32
) -> Patch | None:
    """The patch of one gap: a d x d ``LinearPatch`` (rotate), a ``ScalePatch`` (diag) or None."""
    fit = patch_kind(kind).fit
    return None if fit is None else fit(stats, gap, dtype)


def fit_patches(
    stats: ActivationStats, plan: PruningPlan, kind: str, dtype: torch.dtype = torch.float32
) -> dict[Gap, Patch | None]:
    """One patch per gap of ``plan``."""
    return {gap: fit_patch(stats, gap, kind, dtype) for gap in plan.gaps}
