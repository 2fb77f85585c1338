"""Latency methodology: warm-up, interleaved repeats, robust statistics.

Baseline and candidates are timed in alternation within one run (round-robin, with the
order rotated each round), so drift on a shared, noisy machine hits every case alike and
the ratios stay meaningful even when absolute times wander.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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


def ratio_interval(
    candidate: Sequence[Sequence[float]],
    baseline: Sequence[Sequence[float]],
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of ``median(candidate) / median(baseline)``, resampling rounds.

    ``candidate[r]`` and ``baseline[r]`` are the samples of round ``r`` of one interleaved run
    (one prefill time, or every step time of one decode call): a round is drawn for both
    cases at once, so noise that hits a whole round (another job on the machine) stays paired
    and the interval shows how well the ratio is known, not how much the machine drifted.
    """
    if len(candidate) != len(baseline) or not baseline:
        raise ValueError(f"need the same rounds for both, got {len(candidate)}, {len(baseline)}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    rng = random.Random(seed)
    rounds = len(baseline)
    draws = []
    for _ in range(resamples):
        picks = [rng.randrange(rounds) for _ in range(rounds)]
        cand = statistics.median(x for i in picks for x in candidate[i])
        base = statistics.median(x for i in picks for x in baseline[i])
        draws.append(cand / base)
    tail = (1 - level) / 2
    return quantile(draws, tail), quantile(draws, 1 - tail)
