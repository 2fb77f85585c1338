"""Patch math against its definition: P = H diag(s) H^T, s = mean|x_out H| / mean|x_in H|."""

from __future__ import annotations

import pytest
import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.fit import (
    PATCH_KINDS,
    diag_scales,
    fit_patch,
    fit_patches,
    rotate_matrix,
    rotate_scales,
)
from lp_deploy.hadamard import hadamard_matrix
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.selection import Gap, make_plan
from lp_deploy.stats import ActivationStats, _reduce

D = 64
TOKENS = 200


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(states: torch.Tensor) -> ActivationStats:
    """ActivationStats of states (L+1, tokens, d) through the real reduction."""
    cos_sum, abs_sum, abs_rot_sum = _reduce(states, rotate=True)
    return ActivationStats(int(states.shape[1]), cos_sum, abs_sum, abs_rot_sum)


@pytest.fixture
def states() -> torch.Tensor:
    """Five boundaries (L = 4) of heavy-tailed random states with uneven channel scales."""
    g = _gen(0)
    scale = torch.rand(5, 1, D, generator=g, dtype=torch.float64) * 3 + 0.1
    return torch.randn(5, TOKENS, D, generator=g, dtype=torch.float64) ** 3 * scale


def test_rotate_scales_match_the_definition(states: torch.Tensor) -> None:
    stats = _stats(states)
    h = hadamard_matrix(D)
    for gap in (Gap(0, 1), Gap(1, 3), Gap(2, 4), Gap(0, 4)):
        x_in, x_out = states[gap.start], states[gap.end]
        expected = (x_out @ h).abs().mean(0) / (x_in @ h).abs().mean(0)
        got = rotate_scales(stats, gap)
        assert got.dtype == torch.float64 and got.shape == (D,)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_diag_scales_match_the_definition(states: torch.Tensor) -> None:
    stats = _stats(states)
    gap = Gap(1, 3)
    expected = states[3].abs().mean(0) / states[1].abs().mean(0)
    torch.testing.assert_close(diag_scales(stats, gap), expected, rtol=1e-12, atol=0)


def test_rotate_matrix_is_h_diag_s_ht_and_symmetric() -> None:
    s = torch.rand(D, generator=_gen(1), dtype=torch.float64) + 0.5
    h = hadamard_matrix(D)
    p = rotate_matrix(s)
    assert p.dtype == torch.float64 and p.shape == (D, D)
    torch.testing.assert_close(p, h @ torch.diag(s) @ h.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(p, p.T, rtol=0, atol=1e-14)
    # Its eigenvalues are exactly the scales, with the Hadamard columns as eigenvectors.
    torch.testing.assert_close(p @ h, h * s, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.eigvalsh(p), s.sort().values, rtol=0, atol=1e-12)


def test_rotate_matrix_of_ones_is_identity() -> None:
    p = rotate_matrix(torch.ones(D, dtype=torch.float32))
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-14)


def test_rotate_patch_is_exact_when_out_is_a_scaled_rotation_of_in() -> None:
    """x_out H = (x_in H) * c with c > 0 per channel  =>  x_in @ P == x_out."""
    g = _gen(2)
    h = hadamard_matrix(D)
    x_in = torch.randn(TOKENS, D, generator=g, dtype=torch.float64)
    c = torch.rand(D, generator=g, dtype=torch.float64) * 4 + 0.05
    x_out = ((x_in @ h) * c) @ h.T
    stats = _stats(torch.stack([x_in, x_out]))
    gap = Gap(0, 1)

    torch.testing.assert_close(rotate_scales(stats, gap), c, rtol=1e-12, atol=0)
    p = rotate_matrix(rotate_scales(stats, gap))
    assert (x_in @ p - x_out).abs().max() <= 1e-10

    patch = fit_patch(stats, gap, "rotate", dtype=torch.float64)
    assert isinstance(patch, LinearPatch)
    assert not patch.weight.requires_grad
    assert (patch(x_in) - x_out).abs().max() <= 1e-10


def test_diag_patch_is_exact_when_out_is_a_channel_scaling_of_in() -> None:
    g = _gen(3)
    x_in = torch.randn(TOKENS, D, generator=g, dtype=torch.float64)
    c = torch.rand(D, generator=g, dtype=torch.float64) * 4 + 0.05
    stats = _stats(torch.stack([x_in, x_in * c]))
    gap = Gap(0, 1)
    torch.testing.assert_close(diag_scales(stats, gap), c, rtol=1e-12, atol=0)
    patch = fit_patch(stats, gap, "diag", dtype=torch.float64)
    assert isinstance(patch, ScalePatch)
    assert (patch(x_in) - x_in * c).abs().max() <= 1e-10


def test_identity_gap_gives_identity_patches(states: torch.Tensor) -> None:
    """Equal states on both sides of a gap: the patch is (numerically) the identity."""
    twin = torch.stack([states[0], states[0]])
    stats = _stats(twin)
    p = fit_patch(stats, Gap(0, 1), "rotate", dtype=torch.float64)
    assert isinstance(p, LinearPatch)
    torch.testing.assert_close(p.weight, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-12)
    q = fit_patch(stats, Gap(0, 1), "diag", dtype=torch.float64)
    assert isinstance(q, ScalePatch)
    torch.testing.assert_close(q.scale, torch.ones(D, dtype=torch.float64), rtol=0, atol=1e-12)


def test_patch_dtype_is_cast_once_from_float64(states: torch.Tensor) -> None:
    stats = _stats(states)
    gap = Gap(1, 3)
    p32 = fit_patch(stats, gap, "rotate")
    p64 = fit_patch(stats, gap, "rotate", dtype=torch.float64)
    assert isinstance(p32, LinearPatch) and isinstance(p64, LinearPatch)
    assert p32.weight.dtype == torch.float32
    assert torch.equal(p32.weight, p64.weight.to(torch.float32))


def test_zero_input_channel_gives_finite_scales() -> None:
    x_in = torch.randn(TOKENS, D, generator=_gen(4), dtype=torch.float64)
    x_in[:, 5] = 0.0
    stats = _stats(torch.stack([x_in, x_in + 1.0]))
    assert torch.isfinite(diag_scales(stats, Gap(0, 1))).all()


def test_none_patch_and_unknown_kind(states: torch.Tensor) -> None:
    stats = _stats(states)
    assert fit_patch(stats, Gap(1, 2), "none") is None
    assert set(PATCH_KINDS) == {"rotate", "diag", "lstsq", "lstsq-mlp", "none"}
    with pytest.raises(
        LpDeployError, match=r"unknown patch kind 'hadamard'.*rotate, diag, lstsq, lstsq-mlp, none"
    ):
        fit_patch(stats, Gap(1, 2), "hadamard")


def test_fit_patches_one_per_gap(states: torch.Tensor) -> None:
    stats = _stats(states)
    plan = make_plan(4, [0, 2, 3], "manual")
    assert plan.gaps == (Gap(0, 1), Gap(2, 4))
    patches = fit_patches(stats, plan, "rotate")
    assert list(patches) == list(plan.gaps)
    for gap, patch in patches.items():
        assert isinstance(patch, LinearPatch)
        expected = rotate_matrix(rotate_scales(stats, gap)).to(torch.float32)
        assert torch.equal(patch.weight, expected)
    assert all(p is None for p in fit_patches(stats, plan, "none").values())


def test_rotate_needs_rotated_statistics(states: torch.Tensor) -> None:
    cos_sum, abs_sum, _ = _reduce(states, rotate=False)
    stats = ActivationStats(TOKENS, cos_sum, abs_sum, None)
    with pytest.raises(ValueError, match="no rotated statistics"):
        fit_patch(stats, Gap(1, 2), "rotate")
    assert isinstance(fit_patch(stats, Gap(1, 2), "diag"), ScalePatch)
