"""Choose which decoder layers to delete: cosine (contiguous block), bi (ShortGPT), or manual."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
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


#: held-back loss (mean next-token NLL) of the model with each block deleted and patched:
#: one value per gap, lower is better (:meth:`lp_deploy.pipeline.Calibrated.block_losses`)
BlockScorer = Callable[[Sequence[Gap]], list[float]]


@dataclass(frozen=True)
class SelectionOptions:
    """What methods beyond the statistics may use: ``candidates`` (``ppl``: score only the K
    best cosine blocks; None: all) and the block ``scorer`` (``ppl``)."""

    candidates: int | None = None
    scorer: BlockScorer | None = None


def check_candidates(candidates: int | None, method: str) -> None:
    """A clear error for a ``--candidates`` value that cannot be used with ``method``."""
    if candidates is None:
        return
    if method not in SELECTION_METHODS or not SELECTION_METHODS[method].scores_blocks:
        raise PruningPlanError(
            f"--candidates applies to --select ppl only (got --select {method!r})"
        )
    if candidates < 1:
        raise PruningPlanError(f"--candidates must be at least 1, got {candidates}")


def _or_inf(loss: float | None) -> float:
    return math.inf if loss is None or math.isnan(loss) else loss


def select_ppl(stats: ActivationStats, n: int, options: SelectionOptions) -> PruningPlan:
    """The block ``[i, i+n)`` whose deletion (with the patch) gives the lowest held-back
    loss, among the ``options.candidates`` blocks of highest cosine similarity (all: None)."""
    num_layers = stats.num_layers
    check_prune_count(n, num_layers)
    if options.scorer is None:
        raise PruningPlanError("selection 'ppl' needs a block scorer (a calibrated model)")
    sims = [stats.cosine(i, i + n) for i in range(num_layers - n + 1)]
    ranked = sorted(range(len(sims)), key=lambda i: -sims[i])
    starts = sorted(ranked[: options.candidates or len(ranked)])
    started = time.perf_counter()
    losses = options.scorer([Gap(i, i + n) for i in starts])
    seconds = time.perf_counter() - started
    by_start: list[float | None] = [None] * len(sims)
    for i, loss in zip(starts, losses, strict=True):
        by_start[i] = loss
    best = min(starts, key=lambda i: _or_inf(by_start[i]))
    scores = {
        "loss": by_start[best],
        "ppl": math.exp(float(by_start[best] or 0.0)),
        "similarity": sims[best],
        "cosine_rank": ranked.index(best) + 1,
        "scored": len(starts),
        "seconds": round(seconds, 2),
        "candidates": by_start,
        "similarities": sims,
    }
    return make_plan(num_layers, list(range(best, best + n)), "ppl", scores)


@dataclass(frozen=True)
class SelectionMethod:
    """A rule that picks ``n`` layers to delete from calibration statistics (and, where
    ``scores_blocks``, from the held-back loss of candidate blocks)."""

    name: str
    description: str
    select: Callable[[ActivationStats, int, SelectionOptions], PruningPlan]
    scores_blocks: bool = False


#: every statistics-based selection method, by name (a layer list is the manual alternative)
SELECTION_METHODS: dict[str, SelectionMethod] = {
    m.name: m
    for m in (
        SelectionMethod(
            "cosine",
            "the contiguous block [i, i+n) whose entering and leaving states are most similar",
            lambda stats, n, _opts: select_cosine(stats, n),
        ),
        SelectionMethod(
            "bi",
            "ShortGPT: the n layers of lowest block influence",
            lambda stats, n, _opts: select_bi(stats, n),
        ),
        SelectionMethod(
            "ppl",
            "the contiguous block whose deletion, patched, gives the lowest language-model "
            "loss on held-back calibration windows (--candidates K: the K best cosine blocks)",
            select_ppl,
            scores_blocks=True,
        ),
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
    stats: ActivationStats | None,
    num_layers: int,
    n: int | None,
    method: str,
    options: SelectionOptions | None = None,
) -> PruningPlan:
    """Dispatch on ``method``: a :data:`SELECTION_METHODS` name or a manual layer spec."""
    options = options or SelectionOptions()
    check_candidates(options.candidates, method)
    if method in SELECTION_METHODS:
        if stats is None or n is None:
            raise PruningPlanError(
                f"selection {method!r} needs calibration statistics and --prune N"
            )
        return SELECTION_METHODS[method].select(stats, n, options)
    layers = parse_layers(method)
    if n is not None and n != len(set(layers)):
        raise PruningPlanError(
            f"--prune {n} disagrees with the {len(set(layers))} layers in {method!r}"
        )
    return make_plan(num_layers, layers, "manual")
