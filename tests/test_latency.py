"""Latency methodology, checked with a fake clock (no timing assertions)."""

from __future__ import annotations

import pytest

from lp_deploy.benchmarks.latency import (
    Timing,
    interleaved_order,
    measure_interleaved,
    quantile,
    ratio_interval,
    ratios,
)


class FakeClock:
    """Each case advances the clock by its own cost; the clock also records call order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def case(self, name: str, costs: list[float]) -> object:
        def run() -> None:
            self.calls.append(name)
            self.now += costs.pop(0)

        return run


def test_warmup_runs_are_excluded() -> None:
    clock = FakeClock()
    cases = {
        "base": clock.case("base", [100.0, 1.0, 1.0, 1.0]),  # first call: cold start
        "cand": clock.case("cand", [50.0, 0.5, 0.5, 0.5]),
    }
    out = measure_interleaved(cases, repeats=3, warmup=1, timer=clock)  # type: ignore[arg-type]
    assert out["base"].samples == (1.0, 1.0, 1.0)
    assert out["cand"].samples == (0.5, 0.5, 0.5)
    assert ratios(out, "base") == {"base": 1.0, "cand": 0.5}


def test_cases_are_interleaved_and_rotated() -> None:
    assert interleaved_order(["a", "b", "c"], 2) == ["a", "b", "c", "b", "c", "a"]
    clock = FakeClock()
    cases = {n: clock.case(n, [1.0] * 4) for n in ("a", "b")}
    measure_interleaved(cases, repeats=3, warmup=1, timer=clock)  # type: ignore[arg-type]
    assert clock.calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_drift_hits_all_cases_alike() -> None:
    """A machine slowing down linearly: interleaving keeps the ratio right."""
    clock = FakeClock()
    slow = [1.0 + 0.1 * i for i in range(20)]

    def runner(name: str, base_cost: float) -> object:
        def run() -> None:
            clock.now += base_cost * slow.pop(0)

        return run

    cases = {"base": runner("base", 2.0), "cand": runner("cand", 1.0)}
    out = measure_interleaved(cases, repeats=8, warmup=1, timer=clock)  # type: ignore[arg-type]
    assert ratios(out, "base")["cand"] == pytest.approx(0.5, rel=0.1)


def test_sync_wraps_every_timed_call() -> None:
    clock = FakeClock()
    events: list[str] = []
    cases = {"a": clock.case("a", [1.0, 1.0, 1.0])}
    measure_interleaved(
        cases,
        repeats=2,
        warmup=1,
        timer=clock,  # type: ignore[arg-type]
        sync=lambda: events.append("sync"),
    )
    assert events == ["sync"] * 4


def test_statistics() -> None:
    t = Timing((4.0, 1.0, 3.0, 2.0, 10.0))
    assert t.median == 3.0
    assert t.mean == 4.0
    assert t.p90 == pytest.approx(quantile([1.0, 2.0, 3.0, 4.0, 10.0], 0.9))
    assert quantile([1.0, 2.0, 3.0, 4.0, 10.0], 0.9) == pytest.approx(4.0 + 0.6 * 6.0)
    assert t.to_dict()["median_ms"] == 3000.0
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        measure_interleaved({}, repeats=0)


def test_ratio_interval_resamples_paired_rounds() -> None:
    base = [[1.0 + 0.5 * (r % 3)] for r in range(12)]  # rounds slowed by the machine
    same = [[0.8 * x for x in r] for r in base]  # always 0.8 of the baseline's round
    assert ratio_interval(same, base) == pytest.approx((0.8, 0.8))
    noisy = [[0.8 * x * (1.1 if r % 2 else 0.9)] for r, (x,) in enumerate(base)]
    lo, hi = ratio_interval(noisy, base)
    assert lo < 0.8 < hi and hi - lo < 0.4
    assert ratio_interval(noisy, base) == (lo, hi)  # seeded: the report is reproducible
    steps = [[0.5, 0.6, 0.7]] * 4  # decode: every step time of a call is one round
    assert ratio_interval(steps, [[1.0, 1.2, 1.4]] * 4) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="same rounds"):
        ratio_interval(steps, base)
