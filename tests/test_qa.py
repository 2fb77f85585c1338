"""Zero-shot QA: task loading against the real files, lm-eval prompt formats, scoring."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import pytest

from lp_deploy.benchmarks import qa
from lp_deploy.benchmarks.qa import Example, Request, TaskResult
from lp_deploy.data import default_data_dir

QA_FILES = (
    "piqa/valid.jsonl",
    "piqa/valid-labels.lst",
    "arc/ARC-Easy-Test.jsonl",
    "arc/ARC-Challenge-Test.jsonl",
    "hellaswag/hellaswag_val_full.txt.bz2",
    "boolq/dev.jsonl",
    "winogrande/dev.jsonl",
    "copa/val.jsonl",
    "wsc273/WSCollection.xml",
)
COUNTS = {
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "hellaswag": 10042,
    "boolq": 3270,
    "winogrande": 1267,
    "copa": 100,
    "wsc273": 273,
}
CHOICES = {
    "piqa": {2: 1838},
    "arc_easy": {4: 2365, 3: 7, 5: 4},
    "arc_challenge": {4: 1165, 3: 4, 5: 3},
    "hellaswag": {4: 10042},
    "boolq": {2: 3270},
    "winogrande": {2: 1267},
    "copa": {2: 100},
    "wsc273": {2: 273},
}
PARTIAL = {"winogrande", "wsc273"}  # one context per choice, shared continuation


@pytest.fixture(scope="module")
def qa_dir() -> Path:
    path: Path = default_data_dir()
    missing = [f for f in QA_FILES if not (path / f).is_file()]
    if missing:
        pytest.skip(f"QA data not found in {path} ({', '.join(missing)}); set LP_DEPLOY_DATA_DIR")
    return path


@cache
def _load(name: str, data_dir: Path) -> tuple[Example, ...]:
    return tuple(qa.load_task(name, data_dir))


def _mc(context: str, choices: Sequence[str], gold: int) -> Example:
    requests = tuple(Request(context, " " + c) for c in choices)
    return Example(requests, gold, tuple(choices))


def _partial(contexts: Sequence[str], continuation: str, gold: int) -> Example:
    return Example(tuple(Request(c, continuation) for c in contexts), gold, tuple(contexts))


def _oracle_lls(examples: Sequence[Example]) -> list[float]:
    return [0.0 if j == ex.gold else -1.0 for ex in examples for j in range(len(ex.requests))]


# --------------------------------------------------------------------------- real data


def test_task_names() -> None:
    assert tuple(COUNTS) == qa.TASKS
    assert set(qa.ACC_NORM_TASKS) == {"piqa", "arc_easy", "arc_challenge", "hellaswag"}


@pytest.mark.parametrize("name", qa.TASKS)
def test_task_loads_with_documented_counts(name: str, qa_dir: Path) -> None:
    examples = _load(name, qa_dir)
    assert len(examples) == COUNTS[name]
    assert Counter(len(ex.requests) for ex in examples) == CHOICES[name]
    for ex in examples:
        assert 0 <= ex.gold < len(ex.requests) == len(ex.choice_texts)
        shared = {r.continuation for r in ex.requests} if name in PARTIAL else set()
        shared = shared or {r.context for r in ex.requests}
        assert len(shared) == 1
        assert all(r.continuation.startswith(" ") for r in ex.requests)


FIRST = {
    "piqa": _mc(
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        [
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
            "paper strips, you will also need to supply it with a water bottle and a food dish.",
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
            "jeans material, you will also need to supply it with a water bottle and a food dish.",
        ],
        0,
    ),
    "arc_easy": _mc(
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:",
        [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
        0,
    ),
    "arc_challenge": _mc(
        "Question: An astronomer observes that a planet rotates faster after a meteorite "
        "impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        2,
    ),
    # The extracted ctx reads "... on a roof. he": lm-eval capitalizes ctx_b.
    "hellaswag": _mc(
        "Roof shingle removal: A man is sitting on a roof. He",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        3,
    ),
    "winogrande": _partial(
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        " always got the easier cases.",
        1,
    ),
    # lm-eval's copa choices start with a space and the target delimiter adds another.
    "copa": Example(
        (
            Request("The man turned on the faucet therefore", "  the toilet filled with water."),
            Request("The man turned on the faucet therefore", "  water flowed from the spout."),
        ),
        1,
        (" the toilet filled with water.", " water flowed from the spout."),
    ),
    # "The city councilmen" is lowercased (not at a sentence start); the target keeps the
    # space after the pronoun, so the continuation starts with two spaces, as in lm-eval.
    "wsc273": _partial(
        [
            "The city councilmen refused the demonstrators a permit because the city councilmen",
            "The city councilmen refused the demonstrators a permit because the demonstrators",
        ],
        "  feared violence.",
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(FIRST))
def test_first_example_matches_lm_eval(name: str, qa_dir: Path) -> None:
    assert _load(name, qa_dir)[0] == FIRST[name]


def test_boolq_first_example(qa_dir: Path) -> None:
    ex = _load("boolq", qa_dir)[0]
    context = ex.requests[0].context
    assert context.startswith("Ethanol fuel -- All biomass goes through at least some of")
    assert context.endswith(
        "concluded that producing ethanol from corn uses much less petroleum than producing "
        "gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert [r.continuation for r in ex.requests] == [" no", " yes"]
    assert ex.choice_texts == ("no", "yes") and ex.gold == 0


def test_arc_numeric_labels(qa_dir: Path) -> None:
    ex = _load("arc_easy", qa_dir)[14]  # labels "1".."4", answerKey "2"
    assert ex == _mc(
        "Question: All living and nonliving material is composed of\nAnswer:",
        ["air", "elements", "water", "soil"],
        1,
    )


def test_hellaswag_second_example_and_wikihow(qa_dir: Path) -> None:
    examples = _load("hellaswag", qa_dir)
    assert examples[1].requests[0].context == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    )
    wikihow = examples[3243].requests[0].context  # full sentences: left as extracted
    assert wikihow.startswith("Personal Care and Style: How to become a fashion consultant. Ob")
    assert wikihow.endswith("foundational concepts in fashion.")


def test_wsc273_sentence_start_keeps_case(qa_dir: Path) -> None:
    ex = _load("wsc273", qa_dir)[100]
    assert [r.context[-24:] for r in ex.requests] == [
        "h ran up a tree. The dog",
        "h ran up a tree. the cat",
    ]
    assert ex.requests[0].continuation == "  waited at the bottom."


def test_oracle_scores_one_on_every_task(qa_dir: Path) -> None:
    calls: list[int] = []

    def oracle(requests: Sequence[Request]) -> list[float]:
        start = sum(calls)
        calls.append(len(requests))
        return all_lls[start : start + len(requests)]

    for name in qa.TASKS:
        expected = _load(name, qa_dir)
        all_lls, calls = _oracle_lls(expected), []
        result = qa.evaluate_task(name, oracle, qa_dir, progress=False, chunk=1000)
        assert (result.n, result.acc, result.acc_stderr) == (COUNTS[name], 1.0, 0.0)
        assert result.acc_norm == (1.0 if name in qa.ACC_NORM_TASKS else None)
        # chunks of 1,000 examples, each example's choices in one call
        sizes = [
            sum(len(ex.requests) for ex in expected[i : i + 1000])
            for i in range(0, len(expected), 1000)
        ]
        assert calls == sizes


def test_limit_takes_first_examples(qa_dir: Path) -> None:
    assert tuple(qa.load_task("copa", qa_dir, limit=7)) == _load("copa", qa_dir)[:7]
    assert len(qa.load_task("copa", qa_dir, limit=1000)) == 100

    def fn(requests: Sequence[Request]) -> list[float]:
        assert len(requests) == 2 * 5
        return [0.0] * len(requests)

    results = qa.evaluate_tasks(["piqa", "winogrande"], fn, qa_dir, limit=5, progress=False)
    assert [(r.task, r.n) for r in results.values()] == [("piqa", 5), ("winogrande", 5)]
    with pytest.raises(ValueError, match="limit"):
        qa.load_task("copa", qa_dir, limit=0)


# --------------------------------------------------------------------------- scoring


def test_acc_and_acc_norm_differ_on_length() -> None:
    # ll = -c * bytes(continuation): raw acc prefers the short wrong choice, acc_norm
    # (ll / len(choice)) the long gold one.
    ex = _mc("Q:", ["xx", "yyyyyyyy"], 1)
    lls = [-0.5 * len(r.continuation.encode()) for r in ex.requests]  # -1.5, -4.5
    result = qa.score_examples("piqa", [ex], lls)
    assert (result.acc, result.acc_norm) == (0.0, 1.0)
    assert qa.score_examples("boolq", [ex], lls).acc_norm is None


def test_acc_norm_divides_by_characters_not_bytes() -> None:
    # "ééé" is 3 characters and 6 bytes: by characters choice 1 wins (-0.9 > -1.33),
    # by bytes choice 0 would (-0.67 > -0.9). lm-eval's acc_norm uses len(str).
    ex = _mc("Q:", ["ééé", "abcd"], 1)
    assert qa.score_examples("arc_easy", [ex], [-4.0, -3.6]).acc_norm == 1.0


def test_ties_pick_the_first_choice() -> None:
    examples = [_mc("Q:", ["a", "b"], 0), _mc("Q:", ["a", "b"], 1)]
    assert qa.score_examples("piqa", examples, [-1.0] * 4).acc == 0.5


def test_stderr_is_sample_standard_error() -> None:
    examples = [_mc("Q:", ["a", "b"], g) for g in (0, 0, 0, 1)]
    result = qa.score_examples("piqa", examples, [0.0, -1.0] * 4)  # always predicts 0
    assert result.acc == 0.75
    assert result.acc_stderr == pytest.approx(0.25)  # std (n-1) = 0.5, / sqrt(4)
    assert math.isnan(qa.score_examples("copa", examples[:1], [0.0, -1.0]).acc_stderr)


def test_wrong_number_of_loglikelihoods() -> None:
    with pytest.raises(ValueError, match="3 log-likelihoods for 4 requests"):
        qa.score_examples("piqa", [_mc("Q:", ["a", "b"], 0)] * 2, [0.0] * 3)


def test_hellaswag_preprocess() -> None:
    text = " Sports: [header] How to kick [title] Aim well. [step]  Kick  hard [x]. "
    # One pass of "  " -> " ", as in lm-eval: the three spaces left by "[step]" become two.
    assert qa.hellaswag_preprocess(text) == "Sports: How to kick. Aim well.  Kick hard ."
    assert qa._capitalize_ctx_b("Run: A man runs. the man") == "Run: A man runs. The man"
    assert qa._capitalize_ctx_b("Run: A man runs. He stops.") == "Run: A man runs. He stops."


def test_evaluate_task_on_a_small_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"premise": "It rained.", "choice1": "A", "choice2": "B", "question": q, "label": g}
        for q, g in (("effect", 0), ("cause", 1), ("effect", 1))
    ]
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[Request] = []

    def fn(requests: Sequence[Request]) -> list[float]:
        seen.extend(requests)
        return [-1.0, -2.0] * 3  # always choice 0

    result = qa.evaluate_task("copa", fn, tmp_path, progress=False)
    assert result == TaskResult("copa", 3, 1 / 3, None, pytest.approx(1 / 3), None, [1, 0, 0])
    assert seen[2] == Request("It rained because", "  a")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- errors, data dir


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        qa.load_task("piqa", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "piqa" / "valid.jsonl") in message
    assert "--data-dir" in message and "LP_DEPLOY_DATA_DIR" in message


def test_default_data_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_DEPLOY_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="wsc273"):
        qa.load_task("wsc273")


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown QA task 'mmlu'"):
        qa.load_task("mmlu")


# --------------------------------------------------------------------------- retained performance


def _result(task: str, acc: float, acc_norm: float | None = None) -> TaskResult:
    return TaskResult(task, 100, acc, acc_norm, 0.0, None if acc_norm is None else 0.0)


def test_retained_performance() -> None:
    baseline = {"piqa": _result("piqa", 0.6, 0.8), "copa": _result("copa", 0.4)}
    candidate = {
        "copa": _result("copa", 0.3),
        "piqa": _result("piqa", 0.5, 0.4),
        "boolq": _result("boolq", 0.9),  # not in the baseline: ignored
    }
    rp = qa.retained_performance(candidate, baseline)
    assert list(rp) == ["piqa", "copa", "average", "mean_of_ratios"]
    assert rp["piqa"] == pytest.approx(0.5 / 0.6) and rp["copa"] == pytest.approx(0.75)
    assert rp["average"] == pytest.approx(0.8 / 1.0)  # mean 0.4 / mean 0.5
    assert rp["mean_of_ratios"] == pytest.approx((0.5 / 0.6 + 0.75) / 2)
    norm = qa.retained_performance(candidate, baseline, metric="acc_norm")
    assert norm["piqa"] == pytest.approx(0.5) and norm["copa"] == pytest.approx(0.75)
    assert norm["average"] == pytest.approx(0.7 / 1.2)
    with pytest.raises(ValueError, match="no task in common"):
        qa.retained_performance({"boolq": _result("boolq", 0.9)}, baseline)


def test_paired_difference_on_the_same_questions() -> None:
    a = [1, 1, 0, 1, 0, 1, 1, 1]
    b = [1, 0, 0, 1, 0, 0, 1, 0]
    d = qa.paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / 8
    se = (sum((x - mean) ** 2 for x in diffs) / 7) ** 0.5 / 8**0.5
    assert d.n == 8 and d.diff == pytest.approx(mean) and d.stderr == pytest.approx(se)
    assert d.significant == (abs(mean) > 1.96 * se)
    assert not qa.paired_difference(a, a).significant and qa.paired_difference(a, a).diff == 0
    with pytest.raises(ValueError, match="same questions"):
        qa.paired_difference(a, b[:-1])
    ex = [_mc("c", ["x", "y"], 0)] * 8
    ra = qa.score_examples("copa", ex, [v for x in a for v in ((0.0, -1.0) if x else (-1.0, 0.0))])
    rb = qa.score_examples("copa", ex, [v for x in b for v in ((0.0, -1.0) if x else (-1.0, 0.0))])
    assert ra.correct == a and rb.correct == b
    both = qa.paired_differences({"copa": ra}, {"copa": rb})
    assert both["copa"] == both["all"] == d
