"""Layer selection: cosine block, ShortGPT block influence, manual specs, plan edge cases."""

from __future__ import annotations

import json

import pytest
import torch

from lp_deploy.errors import PruningPlanError
from lp_deploy.selection import (
    Gap,
    PruningPlan,
    make_plan,
    parse_layers,
    select,
    select_bi,
    select_cosine,
)
from lp_deploy.stats import ActivationStats

L = 12
N_TOKENS = 50


def _stats(cos: torch.Tensor) -> ActivationStats:
    """Synthetic stats whose mean cosines are ``cos`` (an (L+1, L+1) matrix)."""
    n = cos.shape[0]
    return ActivationStats(
        n_tokens=N_TOKENS,
        cos_sum=cos.to(torch.float64) * N_TOKENS,
        abs_sum=torch.ones(n, 4, dtype=torch.float64),
        abs_rot_sum=None,
    )


def _cos_with(pairs: dict[tuple[int, int], float], num_layers: int = L) -> torch.Tensor:
    """Mean cosine 0.5 everywhere (1 on the diagonal) except the given symmetric pairs."""
    cos = torch.full((num_layers + 1, num_layers + 1), 0.5, dtype=torch.float64)
    cos.fill_diagonal_(1.0)
    for (i, j), v in pairs.items():
        cos[i, j] = cos[j, i] = v
    return cos


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("n", [1, 3, 5])
def test_cosine_picks_the_most_similar_block(n: int) -> None:
    best = 4
    cos = _cos_with({(i, i + n): 0.6 + 0.01 * i for i in range(L - n + 1)})
    cos[best, best + n] = cos[best + n, best] = 0.99
    plan = select_cosine(_stats(cos), n)
    assert plan.gaps == (Gap(best, best + n),)
    assert plan.removed == list(range(best, best + n))
    assert plan.kept == [i for i in range(L) if not best <= i < best + n]
    assert plan.method == "cosine"
    assert plan.scores["similarity"] == pytest.approx(0.99)
    expected = [0.99 if i == best else 0.6 + 0.01 * i for i in range(L - n + 1)]
    assert plan.scores["candidates"] == pytest.approx(expected)
    assert plan.patch_position(plan.gaps[0]) == best


def test_cosine_ignores_pairs_of_other_distances() -> None:
    n = 3
    cos = _cos_with({(i, i + n): 0.7 for i in range(L - n + 1)})
    cos[6, 9] = cos[9, 6] = 0.8
    cos[1, 3] = cos[3, 1] = 0.999  # distance 2: not a candidate for n = 3
    cos[2, 7] = cos[7, 2] = 0.999  # distance 5
    assert select_cosine(_stats(cos), n).gaps == (Gap(6, 9),)


def test_cosine_gap_at_layer_zero() -> None:
    n = 2
    cos = _cos_with({(0, n): 0.95})
    plan = select_cosine(_stats(cos), n)
    assert plan.gaps == (Gap(0, 2),)
    assert plan.patch_position(plan.gaps[0]) == 0
    assert plan.kept[0] == 2


def test_cosine_gap_ending_at_the_last_layer() -> None:
    n = 3
    cos = _cos_with({(L - n, L): 0.95})
    plan = select_cosine(_stats(cos), n)
    assert plan.gaps == (Gap(L - n, L),)
    # The patch goes before the final norm: its position is the new layer count.
    assert plan.patch_position(plan.gaps[0]) == len(plan.kept) == L - n


# --------------------------------------------------------------------------- bi


def test_bi_picks_the_lowest_influence_layers_and_groups_them() -> None:
    # influence(i) = 1 - cos(i, i+1); make layers 2, 3, 7 and 11 the least influential.
    low = {2: 0.99, 3: 0.98, 7: 0.97, 11: 0.96}
    cos = _cos_with({(i, i + 1): low.get(i, 0.5 + 0.01 * i) for i in range(L)})
    plan = select_bi(_stats(cos), 4)
    assert plan.method == "bi"
    assert plan.removed == [2, 3, 7, 11]
    assert plan.gaps == (Gap(2, 4), Gap(7, 8), Gap(11, 12))
    assert plan.kept == [0, 1, 4, 5, 6, 8, 9, 10]
    positions = [plan.patch_position(g) for g in plan.gaps]
    assert positions == [2, 5, 8]  # the last gap ends at the final norm
    influence = plan.scores["block_influence"]
    assert len(influence) == L
    assert influence[11] == pytest.approx(0.04)
    assert influence[0] == pytest.approx(0.5)


def test_bi_single_layer() -> None:
    cos = _cos_with({(i, i + 1): 0.5 for i in range(L)} | {(5, 6): 0.9})
    assert select_bi(_stats(cos), 1).gaps == (Gap(5, 6),)


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("fn", [select_cosine, select_bi])
@pytest.mark.parametrize("n", [L, L + 1, 100])
def test_pruning_every_layer_is_refused(fn: object, n: int) -> None:
    with pytest.raises(PruningPlanError, match=r"at least one layer must remain.*between 1 and 11"):
        fn(_stats(_cos_with({})), n)  # type: ignore[operator]


@pytest.mark.parametrize("fn", [select_cosine, select_bi])
@pytest.mark.parametrize("n", [0, -1])
def test_pruning_nothing_is_refused(fn: object, n: int) -> None:
    with pytest.raises(PruningPlanError, match="at least 1"):
        fn(_stats(_cos_with({})), n)  # type: ignore[operator]


def test_largest_allowed_prune() -> None:
    plan = select_cosine(_stats(_cos_with({})), L - 1)
    assert len(plan.kept) == 1
    assert plan.gaps in ((Gap(0, L - 1),), (Gap(1, L),))


# --------------------------------------------------------------------------- manual


@pytest.mark.parametrize(
    ("spec", "layers"),
    [
        ("3,4,7", [3, 4, 7]),
        ("10-14", [10, 11, 12, 13, 14]),
        ("10:15", [10, 11, 12, 13, 14]),
        ("10..14", [10, 11, 12, 13, 14]),
        ("7", [7]),
        (" 1 , 3-4 , 6:8 ", [1, 3, 4, 6, 7]),
        ("5-5", [5]),
        ("2,", [2]),
    ],
)
def test_parse_layers(spec: str, layers: list[int]) -> None:
    assert parse_layers(spec) == layers


@pytest.mark.parametrize("spec", ["a", "3;4", "-1", "3-", "1.5", "cos"])
def test_parse_layers_rejects_garbage(spec: str) -> None:
    with pytest.raises(PruningPlanError, match="bad layer spec"):
        parse_layers(spec)


@pytest.mark.parametrize("spec", ["14-10", "10:10", "5:3"])
def test_parse_layers_rejects_empty_ranges(spec: str) -> None:
    with pytest.raises(PruningPlanError, match="empty layer range"):
        parse_layers(spec)


def test_manual_selection_groups_gaps() -> None:
    plan = select(None, 16, None, "10-14")
    assert plan.method == "manual"
    assert plan.gaps == (Gap(10, 15),)
    assert plan.patch_position(plan.gaps[0]) == 10

    plan = select(None, 16, 3, "3,4,7")
    assert plan.gaps == (Gap(3, 5), Gap(7, 8))
    assert [plan.patch_position(g) for g in plan.gaps] == [3, 5]

    plan = select(None, 16, 2, "4,3,3")  # order and duplicates do not matter
    assert plan.removed == [3, 4]


def test_manual_gap_at_layer_zero_and_at_the_end() -> None:
    plan = select(None, 8, None, "0,1,6,7")
    assert plan.gaps == (Gap(0, 2), Gap(6, 8))
    assert plan.kept == [2, 3, 4, 5]
    assert plan.patch_position(plan.gaps[0]) == 0
    assert plan.patch_position(plan.gaps[1]) == 4 == len(plan.kept)


def test_manual_selection_errors() -> None:
    with pytest.raises(PruningPlanError, match=r"--prune 2 disagrees with the 3 layers in '3,4,7'"):
        select(None, 16, 2, "3,4,7")
    with pytest.raises(PruningPlanError, match=r"layer indices \[8, 9\] out of range.*0\.\.7"):
        select(None, 8, None, "6-9")
    with pytest.raises(PruningPlanError, match="at least one layer must remain"):
        select(None, 8, None, "0-7")
    with pytest.raises(PruningPlanError, match="at least 1"):
        make_plan(8, [], "manual")


@pytest.mark.parametrize("method", ["cosine", "bi"])
def test_statistics_methods_need_stats_and_a_count(method: str) -> None:
    with pytest.raises(PruningPlanError, match="needs calibration statistics and --prune N"):
        select(None, 8, 2, method)
    with pytest.raises(PruningPlanError, match="--prune N"):
        select(_stats(_cos_with({}, 8)), 8, None, method)


def test_select_dispatch() -> None:
    cos = _cos_with({(3, 5): 0.99, (3, 4): 0.999, (8, 9): 0.998})
    stats = _stats(cos)
    assert select(stats, L, 2, "cosine").gaps == (Gap(3, 5),)
    assert select(stats, L, 2, "bi").gaps == (Gap(3, 4), Gap(8, 9))


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize(
    "plan",
    [
        make_plan(12, [2, 3, 7, 11], "bi", {"block_influence": [0.1] * 12}),
        make_plan(8, [0], "manual"),
        make_plan(30, list(range(20, 25)), "cosine", {"similarity": 0.93, "candidates": [0.5]}),
    ],
)
def test_plan_round_trip(plan: PruningPlan) -> None:
    data = plan.to_dict()
    assert data["removed"] == plan.removed
    assert data["gaps"] == [[g.start, g.end] for g in plan.gaps]
    back = PruningPlan.from_dict(json.loads(json.dumps(data)))
    assert back == plan
    assert back.kept == plan.kept
    assert [back.patch_position(g) for g in back.gaps] == [
        plan.patch_position(g) for g in plan.gaps
    ]


def test_from_dict_validates() -> None:
    with pytest.raises(PruningPlanError, match="out of range"):
        PruningPlan.from_dict({"num_layers": 4, "gaps": [[3, 6]], "method": "manual"})
