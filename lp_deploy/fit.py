"""Fit patches from activation statistics (float64, cast once).

``rotate`` and ``diag`` need only the per-boundary :class:`ActivationStats`; the least-squares
kinds (``lstsq``, ``lstsq-mlp``) solve streamed normal equations (:class:`GramStats`), which
are collected per gap on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.hadamard import hadamard_matrix
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.selection import Gap, PruningPlan
from lp_deploy.stats import ActivationStats, GramStats

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


def lstsq_matrix(gram: GramStats, ridge: float = 0.0) -> torch.Tensor:
    """``argmin_P ||X P - Y||^2 + lam ||P||^2`` from the normal equations, in float64.

    ``lam = ridge * trace(X^T X) / d`` (``ridge`` is relative to the mean input energy).
    """
    d = gram.xtx.shape[0]
    lhs = gram.xtx.clone()
    if ridge > 0:
        lhs += torch.eye(d, dtype=lhs.dtype) * (ridge * float(lhs.diagonal().sum()) / d)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(gram.xty, chol)
    # singular (e.g. fewer tokens than channels): the minimum-norm solution
    return torch.linalg.lstsq(lhs, gram.xty, driver="gelsd").solution


@dataclass
class FitInputs:
    """What fitting may use: the per-boundary statistics, the least-squares sums of each
    gap (only for kinds with a ``gram_site``), and the ridge of the least-squares kinds."""

    stats: ActivationStats
    gram: dict[Gap, GramStats] = field(default_factory=dict)
    ridge: float = 0.0

    def gram_of(self, gap: Gap) -> GramStats:
        if gap not in self.gram:
            raise LpDeployError(f"no least-squares statistics were collected for gap {gap}")
        return self.gram[gap]


def _fit_rotate(inputs: FitInputs, gap: Gap, dtype: torch.dtype) -> Patch:
    return LinearPatch(rotate_matrix(rotate_scales(inputs.stats, gap)).to(dtype))


def _fit_diag(inputs: FitInputs, gap: Gap, dtype: torch.dtype) -> Patch:
    return ScalePatch(diag_scales(inputs.stats, gap).to(dtype))


def _fit_lstsq(inputs: FitInputs, gap: Gap, dtype: torch.dtype) -> Patch:
    return LinearPatch(lstsq_matrix(inputs.gram_of(gap), inputs.ridge).to(dtype))


@dataclass(frozen=True)
class PatchKind:
    """A way to bridge a gap: how it is fitted and what it needs."""

    name: str
    description: str
    fit: Callable[[FitInputs, Gap, torch.dtype], Patch] | None  # None: no patch
    needs_hadamard: bool = False  # the hidden size must have a Hadamard matrix
    #: least-squares kinds: where X is read (``lp_deploy.stats.GRAM_SITES``); None: no sums
    gram_site: str | None = None
    #: the fitted map is folded into the down_proj of the last layer before the gap at fit
    #: time (no patch module); a gap at layer 0 falls back to ``fallback``
    folds_into_mlp: bool = False
    fallback: str | None = None


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
        PatchKind(
            "lstsq",
            "full d x d P = argmin ||X_in P - X_out||^2 (closed form; one MatMul)",
            _fit_lstsq,
            gram_site="input",
        ),
        PatchKind(
            "lstsq-mlp",
            "ReplaceMe: least-squares map on the MLP output of the layer before the gap, "
            "folded into its down_proj (plain transformers checkpoint; gap at 0 -> lstsq)",
            _fit_lstsq,
            gram_site="mlp",
            folds_into_mlp=True,
            fallback="lstsq",
        ),
        PatchKind("none", "no patch: the layers are just deleted", None),
    )
}


def patch_kind(name: str) -> PatchKind:
    """The registered kind ``name``; a clear error naming the choices otherwise."""
    if name not in PATCH_KINDS:
        raise LpDeployError(f"unknown patch kind {name!r}; choose one of {', '.join(PATCH_KINDS)}")
    return PATCH_KINDS[name]


def effective_kind(kind: str, gap: Gap, blocked: Collection[Gap] = ()) -> str:
    """The kind actually fitted at ``gap``: a kind that folds into the MLP before the gap
    falls back where there is no such layer (a gap at 0) or it cannot take the map
    (``blocked``, see :func:`lp_deploy.pipeline.mlp_fold_blocker`)."""
    k = patch_kind(kind)
    if k.folds_into_mlp and k.fallback is not None and (gap.start == 0 or gap in blocked):
        return k.fallback
    return kind


def gram_requests(
    plan: PruningPlan, kind: str, blocked: Collection[Gap] = ()
) -> list[tuple[str, int, int]]:
    """The least-squares sums (site, start, end) that fitting ``kind`` on ``plan`` needs."""
    out = []
    for gap in plan.gaps:
        site = patch_kind(effective_kind(kind, gap, blocked)).gram_site
        if site is not None:
            out.append((site, gap.start, gap.end))
    return out


def _as_inputs(source: ActivationStats | FitInputs) -> FitInputs:
    return source if isinstance(source, FitInputs) else FitInputs(source)


def fit_patch(
    source: ActivationStats | FitInputs, gap: Gap, kind: str, dtype: torch.dtype = torch.float32
) -> Patch | None:
    """The patch of one gap: a d x d ``LinearPatch`` (rotate, lstsq), a ``ScalePatch`` (diag)
    or None; for ``lstsq-mlp`` the ``LinearPatch`` holds the map to fold into down_proj."""
    fit = patch_kind(kind).fit
    return None if fit is None else fit(_as_inputs(source), gap, dtype)


def fit_patches(
    source: ActivationStats | FitInputs,
    plan: PruningPlan,
    kind: str,
    dtype: torch.dtype = torch.float32,
    blocked: Collection[Gap] = (),
) -> dict[Gap, Patch | None]:
    """One patch per gap of ``plan`` (of its :func:`effective_kind`)."""
    return {
        gap: fit_patch(source, gap, effective_kind(kind, gap, blocked), dtype) for gap in plan.gaps
    }
