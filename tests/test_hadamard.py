"""Tests for lp_deploy.hadamard: exact base matrices, orthonormality, fast transform."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from lp_deploy.hadamard import (
    SUPPORTED_BASE_ORDERS,
    UnsupportedHadamardSize,
    base_matrix,
    hadamard_factors,
    hadamard_kron_factors,
    hadamard_matrix,
    hadamard_transform,
    is_supported,
)

REQUIRED_BASE_ORDERS = (1, 2, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
MAX_D = 16384
ALL_SIZES = sorted({k << m for k in SUPPORTED_BASE_ORDERS for m in range(15) if k << m <= MAX_D})
EXPLICIT = {
    576: (36, 16),
    640: (20, 32),
    896: (28, 32),
    1536: (12, 128),
    2048: (1, 2048),
    3584: (28, 128),
    4096: (1, 4096),
    5120: (20, 256),
    8192: (1, 8192),
    11008: (172, 64),
    13824: (108, 128),
    14336: (28, 512),
}
DENSE_GRAM_MAX = 512  # full dense H H^T check up to here (and for GRAM_EXTRA)
GRAM_EXTRA = (576, 640, 896)
DENSE_BUILD_MAX = 2048  # dense matrix built (Kronecker + sampled rows) up to here
UNSUPPORTED = (3, 5, 6, 9, 1000, 47 * 16, 188 * 32, 65 * 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small matmuls: one thread avoids oversubscription on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sylvester_ref(m: int) -> torch.Tensor:
    """Sylvester matrix by its closed form (-1)^popcount(i & j), independent of the module."""
    i = torch.arange(m)
    x = i[:, None] & i[None, :]
    parity = torch.zeros_like(x)
    for b in range(max(m.bit_length() - 1, 0)):
        parity ^= (x >> b) & 1
    return (1 - 2 * parity).to(torch.float64)


def _one_hot(idx: torch.Tensor, d: int) -> torch.Tensor:
    out = torch.zeros(len(idx), d, dtype=torch.float64)
    out[torch.arange(len(idx)), idx] = 1.0
    return out


def _kron_ref(d: int) -> torch.Tensor:
    k, m = hadamard_factors(d)
    return torch.kron(base_matrix(k).to(torch.float64), _sylvester_ref(m)) / math.sqrt(d)


# --------------------------------------------------------------------------- base orders


def test_required_base_orders_present() -> None:
    assert set(REQUIRED_BASE_ORDERS) <= set(SUPPORTED_BASE_ORDERS)
    assert list(SUPPORTED_BASE_ORDERS) == sorted(set(SUPPORTED_BASE_ORDERS))


@pytest.mark.parametrize("k", SUPPORTED_BASE_ORDERS)
def test_base_matrix_exact(k: int) -> None:
    h = base_matrix(k)
    assert h.dtype == torch.int64 and h.shape == (k, k)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64))


def test_base_matrix_is_a_fresh_copy() -> None:
    base_matrix(12).zero_()
    hadamard_matrix(12).zero_()
    assert bool((base_matrix(12).abs() == 1).all())
    assert torch.allclose(
        hadamard_matrix(12).abs(), torch.full((12, 12), 12**-0.5, dtype=torch.float64)
    )


# --------------------------------------------------------------------------- sizes


def test_explicit_sizes_supported() -> None:
    for d, factors in EXPLICIT.items():
        assert is_supported(d), d
        assert hadamard_factors(d) == factors, d
        assert d > MAX_D or d in ALL_SIZES


@pytest.mark.parametrize("d", ALL_SIZES)
def test_factors(d: int) -> None:
    k, m = hadamard_factors(d)
    assert k * m == d and k in SUPPORTED_BASE_ORDERS and m & (m - 1) == 0
    smaller = [kk for kk in SUPPORTED_BASE_ORDERS if kk < k and d % kk == 0]
    assert all((d // kk) & (d // kk - 1) != 0 for kk in smaller)  # smallest K chosen
    assert is_supported(d)


@pytest.mark.parametrize("d", UNSUPPORTED)
def test_unsupported_sizes(d: int) -> None:
    assert not is_supported(d)
    with pytest.raises(UnsupportedHadamardSize) as info:
        hadamard_factors(d)
    msg = str(info.value)
    assert "--patch diag" in msg and str(d) in msg and "2^m" in msg and "172" in msg
    assert info.value.size == d
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_matrix(d)
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_transform(torch.zeros(2, d))


@pytest.mark.parametrize("d", [0, -4])
def test_nonpositive_size(d: int) -> None:
    assert not is_supported(d)
    with pytest.raises(ValueError):
        hadamard_factors(d)


# --------------------------------------------------------------------------- orthonormality


@pytest.mark.parametrize("d", [d for d in ALL_SIZES if d <= DENSE_GRAM_MAX or d in GRAM_EXTRA])
def test_dense_orthonormal(d: int) -> None:
    h = hadamard_matrix(d)
    assert h.dtype == torch.float64 and h.shape == (d, d)
    assert (h @ h.T - torch.eye(d, dtype=torch.float64)).abs().max().item() <= 1e-10
    assert torch.equal(h, _kron_ref(d))


@pytest.mark.parametrize(
    "d", [d for d in ALL_SIZES if DENSE_GRAM_MAX < d <= DENSE_BUILD_MAX and d not in GRAM_EXTRA]
)
def test_dense_kronecker_structure(d: int) -> None:
    """kron of two orthonormal factors is orthonormal; also check sampled rows of H H^T."""
    h = hadamard_matrix(d)
    assert torch.equal(h, _kron_ref(d))
    rows = torch.randperm(d, generator=torch.Generator().manual_seed(d))[:8]
    gram = h[rows] @ h.T
    assert (gram - _one_hot(rows, d)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("d", [d for d in ALL_SIZES if d > DENSE_BUILD_MAX])
def test_large_sizes_via_transform(d: int) -> None:
    """No dense d x d here: inner products preserved and sampled rows equal the Kronecker rows."""
    k, m = hadamard_factors(d)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(6, d, generator=gen, dtype=torch.float64)
    y = hadamard_transform(x)
    assert (y @ y.T - x @ x.T).abs().max().item() <= 1e-9 * d
    idx = torch.randint(0, d, (4,), generator=gen)
    rows = hadamard_transform(_one_hot(idx, d))
    base, i = base_matrix(k).to(torch.float64), torch.arange(m)
    for r, j in zip(rows, idx.tolist(), strict=True):
        sylv_row = 1.0 - 2.0 * _popcount_parity(i & (j % m))
        ref = torch.kron(base[j // m], sylv_row) / math.sqrt(d)
        assert (r - ref).abs().max().item() <= 1e-12


def _popcount_parity(x: torch.Tensor) -> torch.Tensor:
    parity = torch.zeros_like(x)
    while bool(x.any()):
        parity ^= x & 1
        x = x >> 1
    return parity.to(torch.float64)


# --------------------------------------------------------------------------- transform


@pytest.mark.parametrize("d", [1, 2, 12, 40, 172, 576, 640, 896, 1536, 2048])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_transform_matches_dense(d: int, batch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(d + len(batch))
    x = torch.randn(*batch, d, generator=gen, dtype=torch.float64)
    h = hadamard_matrix(d)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert (y - x @ h).abs().max().item() <= 1e-10
    x32 = x.to(torch.float32)
    y32 = hadamard_transform(x32)
    assert y32.dtype == torch.float32 and y32.device == x32.device
    assert (y32 - x32 @ hadamard_matrix(d, dtype=torch.float32)).abs().max().item() <= 1e-4


def test_transform_noncontiguous_and_rejects_integers() -> None:
    x = torch.randn(640, 5, dtype=torch.float64).T  # non-contiguous rows
    assert (hadamard_transform(x) - x @ hadamard_matrix(640)).abs().max().item() <= 1e-10
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, dtype=torch.int64))


def test_matrix_dtype_device() -> None:
    h = hadamard_matrix(20, dtype=torch.float32, device="cpu")
    assert h.dtype == torch.float32 and h.device.type == "cpu"
    ref = hadamard_matrix(20).to(torch.float32)
    assert torch.equal(h, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transform_half_precision(dtype: torch.dtype) -> None:
    x = torch.randn(4, 896, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = hadamard_transform(x.to(dtype))
    assert y.dtype == dtype
    assert (y.double() - hadamard_transform(x)).abs().max().item() <= 0.1


@pytest.mark.parametrize("d", [64, 576, 768, 896])
def test_kron_factors_rebuild_the_matrix(d: int) -> None:
    a, b = hadamard_kron_factors(d)
    torch.testing.assert_close(torch.kron(a, b), hadamard_matrix(d), rtol=0, atol=1e-12)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rotated = (torch.matmul(a.T, x.reshape(5, a.shape[0], b.shape[0])) @ b).reshape(5, d)
    torch.testing.assert_close(rotated, hadamard_transform(x), rtol=0, atol=1e-12)
