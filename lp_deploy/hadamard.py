"""Orthonormal Hadamard matrices of order d = K * 2^m and a fast transform.

H_d = kron(H_K, H_M) / sqrt(d), with H_M the Sylvester matrix (M = 2^m) and H_K a
+-1 base matrix from a classical construction:

* Paley I (prime power q = 3 mod 4, order q + 1),
* Paley II (prime power q = 1 mod 4, order 2 (q + 1)),
* Sylvester doubling (order 2 n from order n),
* Williamson (four symmetric circulant +-1 matrices of order n, order 4 n), with
  sequences from the published tables cited at ``_WILLIAMSON``.

Every base matrix is checked (H H^T = K I, exactly, in integers) before it is cached.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable

import torch

__all__ = [
    "SUPPORTED_BASE_ORDERS",
    "UnsupportedHadamardSize",
    "base_matrix",
    "hadamard_factors",
    "hadamard_matrix",
    "hadamard_transform",
    "is_supported",
]

_Poly = list[int]  # coefficients over GF(p), lowest degree first


# --------------------------------------------------------------------------- GF(p^k)


def _prime_power(q: int) -> tuple[int, int]:
    """Return (p, k) with q = p^k, p prime; ValueError if q is not a prime power."""
    p = next(f for f in range(2, q + 1) if q % f == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest, k = rest // p, k + 1
    if rest != 1:
        raise ValueError(f"{q} is not a prime power")
    return p, k


def _poly_mod(a: _Poly, f: _Poly, p: int) -> _Poly:
    """Remainder of a modulo the monic polynomial f over GF(p)."""
    r = [c % p for c in a]
    deg = len(f) - 1
    for i in range(len(r) - 1, deg - 1, -1):
        c = r[i]
        if c:
            for j in range(deg + 1):
                r[i - deg + j] = (r[i - deg + j] - c * f[j]) % p
    return (r + [0] * deg)[:deg]


def _poly_mul(a: _Poly, b: _Poly) -> _Poly:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _irreducible(p: int, k: int) -> _Poly:
    """First monic irreducible polynomial of degree k over GF(p) (trial division)."""
    divisors = [
        [*low, 1] for deg in range(1, k // 2 + 1) for low in itertools.product(range(p), repeat=deg)
    ]
    for low in itertools.product(range(p), repeat=k):
        f = [*low, 1]
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError("unreachable: irreducible polynomials exist for every degree")


def _jacobsthal(q: int) -> list[list[int]]:
    """Jacobsthal matrix Q[i][j] = chi(x_i - x_j) of GF(q), chi the quadratic character.

    Elements are encoded as integers whose base-p digits are the coefficients in the
    polynomial basis modulo an irreducible polynomial; chi(a) = 1 iff a is a nonzero
    square (equivalently a^((q-1)/2) = 1).
    """
    p, k = _prime_power(q)
    f = _irreducible(p, k)
    elems = [[(e // p**i) % p for i in range(k)] for e in range(q)]

    def encode(a: _Poly) -> int:
        return sum(c * p**i for i, c in enumerate(a))

    squares = {encode(_poly_mod(_poly_mul(a, a), f, p)) for a in elems[1:]}
    chi = [0] + [1 if e in squares else -1 for e in range(1, q)]
    return [
        [chi[encode([(x - y) % p for x, y in zip(a, b, strict=True)])] for b in elems]
        for a in elems
    ]


# --------------------------------------------------------------------------- constructions


def _paley1(q: int) -> torch.Tensor:
    """Paley I: order q + 1 for a prime power q = 3 (mod 4); H = I + [[0, 1], [-1, Q]]."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q = 3 mod 4, got {q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = torch.tensor(_jacobsthal(q), dtype=torch.int64)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Paley II: order 2 (q + 1) for a prime power q = 1 (mod 4), from the conference matrix."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q = 1 mod 4, got {q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = torch.tensor(_jacobsthal(q), dtype=torch.int64)
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def _doubling(h: torch.Tensor) -> torch.Tensor:
    """Sylvester doubling [[H, H], [H, -H]]."""
    return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)


def _sylvester(m: int) -> torch.Tensor:
    """+-1 Sylvester matrix of order m (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = _doubling(h)
    return h


def _circulant(row: torch.Tensor) -> torch.Tensor:
    """Circulant matrix with first row ``row``: C[i, j] = row[(j - i) mod n]."""
    n = row.shape[0]
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return row[idx]


# Williamson sequences: first rows of symmetric circulant +-1 matrices A, B, C, D of
# order n with A^2 + B^2 + C^2 + D^2 = 4 n I.  Data only, as tabulated in
#   n = 23, 29, 43: M. Hall Jr., "Combinatorial Theory", 2nd ed., Wiley (table of
#     Williamson matrices; n = 23 from Baumert, Golomb & Hall, Bull. AMS 68 (1962)),
#   n = 39: S. London, "Constructing new Turyn type sequences, T-sequences and Hadamard
#     matrices", PhD thesis, University of Illinois at Chicago (2013),
# transcribed from the table in SageMath's sage/combinat/matrices/hadamard_matrix.py.
_WILLIAMSON: dict[int, tuple[str, str, str, str]] = {
    23: (
        "++---+---+-++-+---+---+",
        "+-++-++--++++++--++-++-",
        "+++---++-+-++-+-++---++",
        "+++-+++-+------+-+++-++",
    ),
    29: (
        "+++---++--+-+----+-+--++---++",
        "+-+---++--+-++++++-+--++---+-",
        "++++-++-+---++++++---+-++-+++",
        "++--+--+-+++-++++-+++-+--+--+",
    ),
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}


def _williamson(n: int) -> torch.Tensor:
    """Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]."""
    rows = [
        torch.tensor([1 if c == "+" else -1 for c in s], dtype=torch.int64) for s in _WILLIAMSON[n]
    ]
    for r in rows:
        if r.shape[0] != n or not torch.equal(r[1:], r[1:].flip(0)):
            raise RuntimeError(f"Williamson sequence of order {n} is not symmetric")
    a, b, c, d = (_circulant(r) for r in rows)
    blocks = [[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]]
    return torch.cat([torch.cat(row, 1) for row in blocks], 0)


_PALEY1_Q = (11, 19, 27, 43, 59, 67, 83, 107, 131, 139, 163, 167, 179)  # prime powers = 3 mod 4
_PALEY2_Q = (17, 25, 37, 49, 61, 73)  # prime powers = 1 mod 4

_CONSTRUCTIONS: dict[int, Callable[[], torch.Tensor]] = {
    1: lambda: torch.ones(1, 1, dtype=torch.int64),
    2: lambda: _doubling(torch.ones(1, 1, dtype=torch.int64)),
    40: lambda: _doubling(_paley1(19)),
    **{n * 4: functools.partial(_williamson, n) for n in _WILLIAMSON},
    **{q + 1: functools.partial(_paley1, q) for q in _PALEY1_Q},
    **{2 * (q + 1): functools.partial(_paley2, q) for q in _PALEY2_Q},
}

SUPPORTED_BASE_ORDERS: tuple[int, ...] = tuple(sorted(_CONSTRUCTIONS))
"""Base orders K with a built-in +-1 Hadamard matrix; supported sizes are K * 2^m."""


@functools.cache
def _base_int(k: int) -> torch.Tensor:
    """Verified +-1 int64 Hadamard matrix of order k (cached: never hand it out)."""
    h = _CONSTRUCTIONS[k]()
    ok = h.shape == (k, k) and bool((h.abs() == 1).all())
    if not ok or not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.int64)):
        raise RuntimeError(f"internal error: base Hadamard matrix of order {k} failed H H^T = K I")
    return h


@functools.cache
def _base_f64(k: int) -> torch.Tensor:
    """Cached float64 copy of the +-1 base matrix (never handed out)."""
    return _base_int(k).to(torch.float64)


def base_matrix(k: int) -> torch.Tensor:
    """Fresh int64 +-1 base matrix of order k in ``SUPPORTED_BASE_ORDERS`` (H H^T = k I)."""
    if k not in _CONSTRUCTIONS:
        raise ValueError(f"no base Hadamard matrix of order {k}; have {SUPPORTED_BASE_ORDERS}")
    return _base_int(k).clone()


# --------------------------------------------------------------------------- public API


class UnsupportedHadamardSize(ValueError):
    """No Hadamard construction for this size (d must be K * 2^m for a supported K)."""

    def __init__(self, d: int) -> None:
        self.size = d
        super().__init__(
            f"no Hadamard matrix of size d={d}: d must be K * 2^m with K one of the supported "
            f"base orders {list(SUPPORTED_BASE_ORDERS)}; use --patch diag (a per-channel patch "
            "that needs no Hadamard matrix)"
        )


def hadamard_factors(d: int) -> tuple[int, int]:
    """Return (K, M), d = K * M, M the largest power of two with K a supported base order."""
    d = operator.index(d)
    if d <= 0:
        raise ValueError(f"Hadamard size must be positive, got {d}")
    m = d & -d
    while m >= 1:
        if d // m in _CONSTRUCTIONS:
            return d // m, m
        m //= 2
    raise UnsupportedHadamardSize(d)


def is_supported(d: int) -> bool:
    """Whether ``hadamard_matrix(d)`` can be built."""
    try:
        hadamard_factors(d)
    except ValueError:
        return False
    return True


def hadamard_matrix(
    d: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Orthonormal Hadamard matrix kron(H_K, H_M) / sqrt(d) (H H^T = I), built in float64."""
    k, m = hadamard_factors(d)
    h = torch.kron(_base_f64(k), _sylvester(m)) / math.sqrt(d)
    return h.to(dtype=dtype, device=device)


def hadamard_kron_factors(
    d: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (A, B), k x k and m x m, with ``hadamard_matrix(d) = kron(A, B)``: for rows
    x reshaped to (k, m), ``x H = A^T X B`` -- two small dense MatMuls (faster than the
    butterfly on CPUs and GPUs for the stream's sizes)."""
    k, m = hadamard_factors(d)
    a = _base_f64(k) / math.sqrt(k)
    b = _sylvester(m).to(torch.float64) / math.sqrt(m)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised x @ H_M (Sylvester) on the last dim by the butterfly, O(M log M)."""
    *batch, m = x.shape
    h = 1
    while h < m:
        y = x.reshape(*batch, m // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*batch, m)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Return x @ hadamard_matrix(d) for rows on the last dim (d = x.shape[-1]), fast.

    With X = x reshaped to (K, M) and H = A kron B: reshape(x H) = A^T X B, cost
    O(d (K + log M)).  Keeps dtype and device; scales first so fp16 stays in range.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating tensor, got {x.dtype}")
    *batch, d = x.shape
    k, m = hadamard_factors(d)
    y = (x * (1.0 / math.sqrt(d))).reshape(*batch, k, m)
    if k > 1:
        a = _base_f64(k).to(dtype=x.dtype, device=x.device)
        y = (y.transpose(-1, -2) @ a).transpose(-1, -2)
    return _fwht(y).reshape(*batch, d)
