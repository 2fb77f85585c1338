"""Choose which decoder layers to delete: cosine (contiguous block), bi (ShortGPT), or manual."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lp_deploy.errors import PruningPlanError
from lp_deploy.stats import ActivationStats


@dataclass(frozen=True)
class Gap:
    """Deleted layers ``[start, end)`` in the original numbering."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PruningPlan:
    """Which layers go; each maximal run of deleted layers is a gap with its own patch."""

    num_layers: int
    gaps: tuple[Gap, ...]
    method: str
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> list[int]:
        return [i for g in self.gaps for i in range(g.start, g.end)]

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [i for i in range(self.num_layers) if i not in gone]

    def patch_position(self, gap: Gap) -> int:
        """New index of the first kept layer after ``gap`` (== new layer count: final norm)."""
        return sum(1 for i in self.kept if i < gap.end)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "gaps": [[g.start, g.end] for g in self.gaps],
            "removed": self.removed,
            "method": self.method,
            "scores": self.scores,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        gaps = tuple(Gap(int(s), int(e)) for s, e in data["gaps"])
        return make_plan(
            int(data["num_layers"]),
            [i for g in gaps for i in range(g.start, g.end)],
            str(data["method"]),
            dict(data.get("scores", {})),
        )


def check_prune_count(n: int, num_layers: int) -> None:
    if n < 1:
        raise PruningPlanError(f"--prune must be at least 1, got {n}")
    if n >= num_layers:
        raise PruningPlanError(
            f"cannot prune {n} of {num_layers} layers: at least one layer must remain; "
            f"choose --prune between 1 and {num_layers - 1}"
        )


def make_plan(
    num_layers: int, removed: list[int], method: str, scores: dict[str, Any] | None = None
) -> PruningPlan:
    """Group removed layer indices into contiguous gaps (validated)."""
    layers = sorted(set(removed))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PruningPlanError(
            f"layer indices {bad} out of range: the model has layers 0..{num_layers - 1}"
        )
    check_prune_count(len(layers), num_layers)
    gaps: list[Gap] = []
    for i in layers:
        if gaps and gaps[-1].end == i:
            gaps[-1] = Gap(gaps[-1].start, i + 1)
        else:
            gaps.append(Gap(i, i + 1))
    return PruningPlan(num_layers, tuple(gaps), method, scores or {})


def select_cosine(stats: ActivationStats, n: int) -> PruningPlan:
    """The block ``[i, i+n)`` maximising mean cos(state entering i, state entering i+n)."""
    num_layers = stats.num_layers
    check_prune_count(n, num_layers)
    sims = [stats.cosine(i, i + n) for i in range(num_layers - n + 1)]
    best = max(range(len(sims)), key=sims.__getitem__)
    scores = {"similarity": sims[best], "candidates": sims}
    return make_plan(num_layers, list(range(best, best + n)), "cosine", scores)


def select_bi(stats: ActivationStats, n: int) -> PruningPlan:
    """ShortGPT: the ``n`` layers with the lowest block influence ``1 - cos(in, out)``."""
    num_layers = stats.num_layers
    check_prune_count(n, num_layers)
    influence = [1.0 - stats.cosine(i, i + 1) for i in range(num_layers)]
    chosen = sorted(range(num_layers), key=influence.__getitem__)[:n]
    return make_plan(num_layers, chosen, "bi", {"block_influence": influence})


@dataclass(frozen=True)
class SelectionMethod:
    """A rule that picks ``n`` layers to delete from calibration statistics."""

    name: str
    description: str
    select: Callable[[ActivationStats, int], PruningPlan]


#: every statistics-based selection method, by name (a layer list is the manual alternative)
SELECTION_METHODS: dict[str, SelectionMethod] = {
    m.name: m
    for m in (
        SelectionMethod(
            "cosine",
            "the contiguous block [i, i+n) whose entering and leaving states are most similar",
            select_cosine,
        ),
        SelectionMethod("bi", "ShortGPT: the n layers of lowest block influence", select_bi),
    )
}


_RANGE = re.compile(r"^(\d+)\s*(?:-|:|\.\.)\s*(\d+)$")


def parse_layers(spec: str) -> list[int]:
    """Manual list: ``"3,4,7"``, ``"10-14"`` or ``"10..14"`` (inclusive), ``"10:15"``."""
    layers: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match[1]), int(match[2])
            hi = hi if ":" in part else hi + 1  # "a-b" and "a..b" inclusive, "a:b" not
            if hi <= lo:
                raise PruningPlanError(
                    f"empty layer range {part!r}: write ranges low to high, e.g. '10-14' "
                    "(inclusive) or '10:15' (end-exclusive)"
                )
            layers.extend(range(lo, hi))
        elif part.isdigit():
            layers.append(int(part))
        else:
            raise PruningPlanError(
                f"bad layer spec {part!r}; use one of {', '.join(SELECTION_METHODS)}, or "
                "layers like '3,4,7' / '10-14' / '10:15'"
            )
    return layers


def select(
    stats: ActivationStats | None, num_layers: int, n: int | None, method: str
) -> PruningPlan:
    """Dispatch on ``method``: a :data:`SELECTION_METHODS` name or a manual layer spec."""
    if method in SELECTION_METHODS:
        if stats is None or n is None:
            raise PruningPlanError(
                f"selection {method!r} needs calibration statistics and --prune N"
            )
        return SELECTION_METHODS[method].select(stats, n)
    layers = parse_layers(method)
    if n is not None and n != len(set(layers)):
        raise PruningPlanError(
            f"--prune {n} disagrees with the {len(set(layers))} layers in {method!r}"
        )
    return make_plan(num_layers, layers, "manual")
