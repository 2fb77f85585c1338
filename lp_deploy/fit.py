"""Fit LinearPatch matrices from activation statistics (float64, cast once)."""

from __future__ import annotations

import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.hadamard import hadamard_matrix
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.selection import Gap, PruningPlan
from lp_deploy.stats import ActivationStats

PATCH_KINDS = ("rotate", "diag", "none")
_EPS = 1e-12


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


def fit_patch(
    stats: ActivationStats, gap: Gap, kind: str, dtype: torch.dtype = torch.float32
) -> LinearPatch | ScalePatch | None:
    """The patch of one gap: a d x d ``LinearPatch`` (rotate), a ``ScalePatch`` (diag) or None."""
    if kind == "rotate":
        return LinearPatch(rotate_matrix(rotate_scales(stats, gap)).to(dtype))
    if kind == "diag":
        return ScalePatch(diag_scales(stats, gap).to(dtype))
    if kind == "none":
        return None
    raise LpDeployError(f"unknown patch kind {kind!r}; choose one of {', '.join(PATCH_KINDS)}")


def fit_patches(
    stats: ActivationStats, plan: PruningPlan, kind: str, dtype: torch.dtype = torch.float32
) -> dict[Gap, LinearPatch | ScalePatch | None]:
    """One patch per gap of ``plan``."""
    return {gap: fit_patch(stats, gap, kind, dtype) for gap in plan.gaps}
