"""Latency methodology: warm-up, interleaved repeats, robust statistics.

Baseline and candidates are timed in alternation within one run (round-robin, with the
order rotated each round), so drift on a shared, noisy machine hits every case alike and
the ratios stay meaningful even when absolute times wander.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Timer = Callable[[], float]


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one case, in seconds (warm-up runs excluded)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return quantile(self.samples, 0.9)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def to_dict(self, scale: float = 1e3) -> dict[str, float | int]:
        """Summary in milliseconds (``scale``)."""
        return {
            "median_ms": self.median * scale,
            "p90_ms": self.p90 * scale,
            "mean_ms": self.mean * scale,
            "n": len(self.samples),
        }


def quantile(values: tuple[float, ...] | list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default 'linear' method)."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def interleaved_order(names: list[str], rounds: int) -> list[str]:
    """Round-robin schedule; each round starts one case later than the previous."""
    return [names[(r + i) % len(names)] for r in range(rounds) for i in range(len(names))]


def measure_interleaved(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    timer: Timer = time.perf_counter,
) -> dict[str, Timing]:
    """Time every case ``repeats`` times after ``warmup`` untimed runs, interleaved.

    ``sync`` runs before reading the clock on both sides of a call (e.g.
    ``torch.cuda.synchronize``) so asynchronous GPU work is counted.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(cases)
    for name in interleaved_order(names, warmup):
        cases[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in interleaved_order(names, repeats):
        if sync:
            sync()
        start = timer()
        cases[name]()
        if sync:
            sync()
        samples[name].append(timer() - start)
    return {n: Timing(tuple(s)) for n, s in samples.items()}


def ratios(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """Median time of each case divided by the baseline's (below 1: faster)."""
    base = timings[baseline].median
    return {name: t.median / base for name, t in timings.items()}
