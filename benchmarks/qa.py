"""Zero-shot multiple-choice QA scored by log-likelihood, as lm-evaluation-harness does it.

Each example becomes one :class:`Request` per choice; the caller's loglikelihood function
returns ``sum log p(continuation | context)`` for each. ``acc`` takes the argmax of those;
``acc_norm`` (piqa, arc, hellaswag only) divides each by ``len(choice)`` first.

Reproduced from EleutherAI/lm-evaluation-harness 0.4.13.dev0, commit
4e7e0d47f33bc71070c1d38394bafbb52b117163 (2026-08-21): ``lm_eval/tasks/`` piqa/piqa.yaml,
arc/arc_easy.yaml, arc/arc_challenge.yaml, hellaswag/{hellaswag.yaml,utils.py},
super_glue/boolq/default.yaml, winogrande/{default.yaml,preprocess_winogrande.py},
super_glue/copa/{default.yaml,utils.py}, wsc273/{default.yaml,utils.py};
``lm_eval/api/task.py`` (``ConfigurableTask.construct_requests`` / ``process_results``, default
``target_delimiter=" "``) and ``lm_eval/api/metrics.py`` (``mean_stderr``). The wsc273 fields
follow the Hugging Face ``winograd_wsc`` builder (huggingface/datasets,
datasets/winograd_wsc/winograd_wsc.py), assumed to be the source of lm-eval's
``lighteval/winograd_wsc`` copy (not checked: if that copy was built from a later
WSCollection.xml whose answers are capitalized, sentence-initial contexts may differ in case).

lm-eval quirks kept on purpose: copa choices already start with a space, so the continuation
starts with two (``"  the toilet ..."``); wsc273's target keeps the space after the pronoun, so
it also starts with two. ``acc_norm`` divides by the character length of the choice (``len(str)``,
lm-eval's ``completion_len``), not its UTF-8 byte length (that is lm-eval's ``acc_bytes``).
"""

from __future__ import annotations

import bz2
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from lp_deploy.data import data_file

TASKS: tuple[str, ...] = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "boolq",
    "winogrande",
    "copa",
    "wsc273",
)
ACC_NORM_TASKS = frozenset({"piqa", "arc_easy", "arc_challenge", "hellaswag"})
TARGET_DELIMITER = " "  # lm-eval's default ``target_delimiter``; no task here overrides it
Metric = Literal["acc", "acc_norm"]


@dataclass(frozen=True)
class Request:
    """One log-likelihood query: score ``continuation`` given ``context``."""

    context: str
    continuation: str  # starts with the target delimiter where lm-eval puts one


@dataclass(frozen=True)
class Example:
    """One question: a request per choice, the gold index and lm-eval's choice strings."""

    requests: tuple[Request, ...]
    gold: int
    choice_texts: tuple[str, ...]  # ``doc_to_choice`` output; ``acc_norm`` divides by len()


@dataclass
class TaskResult:
    """Accuracy of one task; stderr is the sample standard error of the mean.

    ``correct`` / ``correct_norm``: per question (in task order), 1 if answered right; they
    give paired differences between models on the same questions (:func:`paired_difference`).
    """

    task: str
    n: int
    acc: float
    acc_norm: float | None
    acc_stderr: float
    acc_norm_stderr: float | None
    correct: list[int] = field(default_factory=list)
    correct_norm: list[int] | None = None


DataDir = str | Path | None  # None: the default data dir
LoglikelihoodFn = Callable[[Sequence[Request]], list[float]]


# --------------------------------------------------------------------------- data files


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- examples


def _multiple_choice(context: str, choices: Sequence[str], gold: int) -> Example:
    """One context, one continuation per choice (lm-eval's default layout)."""
    requests = tuple(Request(context, TARGET_DELIMITER + c) for c in choices)
    return Example(requests, gold, tuple(choices))


def _multiple_input(contexts: Sequence[str], target: str, gold: int) -> Example:
    """Partial evaluation: one context per choice, the same continuation for all."""
    requests = tuple(Request(c, TARGET_DELIMITER + target) for c in contexts)
    return Example(requests, gold, tuple(contexts))


def _piqa(root: DataDir) -> list[Example]:
    rows = _read_jsonl(data_file("piqa/valid.jsonl", root))
    labels = data_file("piqa/valid-labels.lst", root).read_text(encoding="utf-8").split()
    return [
        _multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(label))
        for r, label in zip(rows, labels, strict=True)
    ]


def _arc_example(row: Mapping[str, Any]) -> Example:
    question = row["question"]
    labels = [c["label"] for c in question["choices"]]
    texts = [c["text"] for c in question["choices"]]
    context = f"Question: {question['stem']}\nAnswer:"
    return _multiple_choice(context, texts, labels.index(row["answerKey"]))


def _arc(relative: str, root: DataDir) -> list[Example]:
    return [_arc_example(r) for r in _read_jsonl(data_file(relative, root))]


def _boolq(root: DataDir) -> list[Example]:
    """SuperGLUE's passage is ``"{title} -- {passage}"`` of the original Google release."""
    rows = _read_jsonl(data_file("boolq/dev.jsonl", root))
    return [
        _multiple_choice(
            f"{r['title']} -- {r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            ["no", "yes"],
            int(r["answer"]),
        )
        for r in rows
    ]


def _winogrande_example(row: Mapping[str, Any]) -> Example:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    gold = {"1": 0, "2": 1}[row["answer"]]
    return _multiple_input(contexts, sentence[blank + 1 :].strip(), gold)


def _winogrande(root: DataDir) -> list[Example]:
    return [_winogrande_example(r) for r in _read_jsonl(data_file("winogrande/dev.jsonl", root))]


def _copa_choice(choice: str) -> str:
    return " " + choice[0].lower() + choice[1:]


def _copa_example(row: Mapping[str, Any]) -> Example:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    context = row["premise"].strip()[:-1] + f" {connector}"
    choices = [_copa_choice(row["choice1"]), _copa_choice(row["choice2"])]
    return _multiple_choice(context, choices, int(row["label"]))


def _copa(root: DataDir) -> list[Example]:
    return [_copa_example(r) for r in _read_jsonl(data_file("copa/val.jsonl", root))]


# --------------------------------------------------------------------------- hellaswag

_ENDS_SENTENCE = re.compile(r"[.!?][\"')]*$")
_LAST_BOUNDARY = re.compile(r"^(.*[.!?][\"')]* )(\S.*)$")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _capitalize_ctx_b(line: str) -> str:
    """Redo lm-eval's ``ctx_b.capitalize()``, lost in the extracted ``ctx``.

    ``ctx_b`` is the unfinished sentence that an ActivityNet context ends with (WikiHow
    contexts end with a full sentence and an empty ``ctx_b``), so it is the text after the
    last sentence end when the line itself does not end one.
    """
    match = None if _ENDS_SENTENCE.search(line) else _LAST_BOUNDARY.match(line)
    return line if match is None else match.group(1) + match.group(2).capitalize()


def _hellaswag(root: DataDir) -> list[Example]:
    """The llama.cpp 6-line text form of the 10,042 validation items.

    Its extractor already dropped ``[header]``/``[step]``/``[substeps]``/``[title]`` tags and
    kept ``ctx`` (``ctx_a + " " + ctx_b``, not capitalized). We recapitalize ``ctx_b`` and run
    lm-eval's ``preprocess`` on the query and endings; small differences from lm-eval on the
    original jsonl remain possible (e.g. an ending that began with a tag gets a leading space
    in lm-eval, and a guessed ``ctx_b`` split can be wrong on a handful of odd items).
    """
    path = data_file("hellaswag/hellaswag_val_full.txt.bz2", root)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines = lines[: len(lines) // 6 * 6]
    return [
        _multiple_choice(
            hellaswag_preprocess(_capitalize_ctx_b(lines[i])),
            [hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
            int(lines[i + 1]),
        )
        for i in range(0, len(lines), 6)
    ]


# --------------------------------------------------------------------------- wsc273

_WSC_UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


@dataclass(frozen=True)
class _WscDoc:
    text: str
    pronoun: str
    pronoun_loc: int
    options: tuple[str, str]
    label: int


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _wsc_doc(schema: ET.Element) -> _WscDoc:
    """One ``<schema>`` as the Hugging Face ``winograd_wsc`` builder turns it into a row."""
    text_root = schema.find("text")
    if text_root is None:
        raise ValueError("WSCollection.xml: a <schema> without <text>")
    left, right = _clean(text_root.findtext("txt1")), _clean(text_root.findtext("txt2"))
    pronoun = _clean(text_root.findtext("pron"))
    a, b = (_clean(x.text) for x in schema.findall("answers/answer")[:2])
    return _WscDoc(
        text=" ".join([left, pronoun, right]).strip(),
        pronoun=pronoun,
        pronoun_loc=len(left) + 1 if left else 0,
        options=(a, b),
        label=int("B" in _clean(schema.findtext("correctAnswer"))),
    )


def _wsc_option(text: str, doc: _WscDoc, option: str) -> str:
    """lm-eval's ``wsc273/utils.py::__normalize_option``."""
    if doc.pronoun.lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    first = option.split()[0]
    start_of_sentence = text[doc.pronoun_loc - 2] == "."
    if not start_of_sentence and first in _WSC_UPPER_PRONOUNS:
        return option.replace(first, first.lower())
    return option


def _wsc_example(doc: _WscDoc) -> Example:
    text = doc.text.replace("  ", " ")
    template = text[: doc.pronoun_loc]
    contexts = [template + _wsc_option(text, doc, o) for o in doc.options]
    return _multiple_input(contexts, text[doc.pronoun_loc + len(doc.pronoun) :], doc.label)


def _wsc273(root: DataDir) -> list[Example]:
    """The first 273 schemas of ``WSCollection.xml`` (ISO-8859-1, declared in the file)."""
    schemas = list(ET.parse(data_file("wsc273/WSCollection.xml", root)).getroot())[:273]
    return [_wsc_example(_wsc_doc(s)) for s in schemas]


_LOADERS: dict[str, Callable[[DataDir], list[Example]]] = {
    "piqa": _piqa,
    "arc_easy": partial(_arc, "arc/ARC-Easy-Test.jsonl"),
    "arc_challenge": partial(_arc, "arc/ARC-Challenge-Test.jsonl"),
    "hellaswag": _hellaswag,
    "boolq": _boolq,
    "winogrande": _winogrande,
    "copa": _copa,
    "wsc273": _wsc273,
}


def load_task(
    name: str, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Example]:
    """The examples of task ``name``; ``limit`` keeps the first N (lm-eval's ``--limit N``)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown QA task {name!r}; choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    return _LOADERS[name](data_dir)[:limit]


# --------------------------------------------------------------------------- scoring


def _mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample std (n - 1) / sqrt(n); NaN below two samples."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _predictions(example: Example, lls: Sequence[float]) -> tuple[int, int]:
    """``argmax(ll)`` and ``argmax(ll / len(choice))``, with numpy's tie and NaN rules."""
    ll = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in example.choice_texts])
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(ll)), int(np.argmax(ll / lengths))


def score_examples(name: str, examples: Sequence[Example], lls: Sequence[float]) -> TaskResult:
    """Accuracy of ``examples`` given the log-likelihoods of all their requests, in order."""
    expected = sum(len(ex.requests) for ex in examples)
    if len(lls) != expected:
        raise ValueError(f"{name}: got {len(lls)} log-likelihoods for {expected} requests")
    acc: list[float] = []
    norm: list[float] = []
    start = 0
    for ex in examples:
        pred, pred_norm = _predictions(ex, lls[start : start + len(ex.requests)])
        start += len(ex.requests)
        acc.append(float(pred == ex.gold))
        norm.append(float(pred_norm == ex.gold))
    has_norm = name in ACC_NORM_TASKS
    return TaskResult(
        task=name,
        n=len(examples),
        acc=sum(acc) / len(acc) if acc else math.nan,
        acc_norm=(sum(norm) / len(norm) if norm else math.nan) if has_norm else None,
        acc_stderr=_mean_stderr(acc),
        acc_norm_stderr=_mean_stderr(norm) if has_norm else None,
        correct=[int(a) for a in acc],
        correct_norm=[int(a) for a in norm] if has_norm else None,
    )


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a_i - b_i`` over the same questions, its standard error, and whether it is
    beyond ``z`` standard errors from 0 (two-sided 95% by default)."""

    diff: float
    stderr: float
    n: int
    significant: bool


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> PairedDifference:
    """Paired difference of two models' per-question scores (same questions, same order).

    The standard error is that of the mean of the per-question differences (sample std,
    n - 1), which accounts for the two models' correlation on the same questions.
    """
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same questions: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    diff = sum(d) / len(d) if d else math.nan
    se = _mean_stderr(d)
    significant = bool(se > 0 and abs(diff) > z * se) or bool(se == 0 and diff != 0)
    return PairedDifference(diff, se, len(d), significant)


def paired_differences(
    candidate: Mapping[str, TaskResult], other: Mapping[str, TaskResult], metric: Metric = "acc"
) -> dict[str, PairedDifference]:
    """Per common task (with per-question results), plus ``"all"``: every question of those
    tasks pooled (equal weight per question)."""
    out: dict[str, PairedDifference] = {}
    pooled_a: list[int] = []
    pooled_b: list[int] = []
    for task in (t for t in other if t in candidate):
        a, b = _per_question(candidate[task], metric), _per_question(other[task], metric)
        if a and len(a) == len(b):
            out[task] = paired_difference(a, b)
            pooled_a += a
            pooled_b += b
    if pooled_a:
        out["all"] = paired_difference(pooled_a, pooled_b)
    return out


def _per_question(result: TaskResult, metric: Metric) -> list[int]:
    if metric == "acc_norm" and result.correct_norm is not None:
        return result.correct_norm
    return result.correct


def _score_chunks(
    loglikelihood: LoglikelihoodFn, chunks: Sequence[Sequence[Request]]
) -> Iterator[list[float]]:
    """Each chunk's log-likelihoods in order; in parallel where the scorer has an ``imap``
    (:class:`~lp_deploy.benchmarks.qa_pool.ScoringPool`)."""
    imap = getattr(loglikelihood, "imap", None)
    return iter(imap(chunks)) if imap is not None else map(loglikelihood, chunks)


def evaluate_task(
    name: str,
    loglikelihood: LoglikelihoodFn,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    chunk: int = 64,
) -> TaskResult:
    """Score one task, ``chunk`` examples per ``loglikelihood`` call (an example's choices stay
    in one call, so shared-context scoring still applies); the progress bar counts examples."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    examples = load_task(name, data_dir, limit)
    parts = [examples[start : start + chunk] for start in range(0, len(examples), chunk)]
    requests = [[r for ex in part for r in ex.requests] for part in parts]
    lls: list[float] = []
    with tqdm(total=len(examples), desc=name, unit="q", disable=not progress) as bar:
        for part, scored in zip(parts, _score_chunks(loglikelihood, requests), strict=True):
            lls += scored
            bar.update(len(part))
    return score_examples(name, examples, lls)


def evaluate_tasks(
    names: Iterable[str],
    loglikelihood: LoglikelihoodFn,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """:func:`evaluate_task` for each name, in order."""
    return {name: evaluate_task(name, loglikelihood, data_dir, limit, progress) for name in names}


# --------------------------------------------------------------------------- retained performance


def _metric_value(result: TaskResult, metric: Metric) -> float:
    """``acc`` or ``acc_norm``; ``acc_norm`` falls back to ``acc`` where lm-eval has none."""
    if metric == "acc_norm" and result.acc_norm is not None:
        return result.acc_norm
    return result.acc


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def retained_performance(
    candidate: Mapping[str, TaskResult],
    baseline: Mapping[str, TaskResult],
    metric: Metric = "acc",
) -> dict[str, float]:
    """Candidate / baseline per task (those in both), plus two averages.

    ``"average"`` is the paper's RP: mean candidate metric / mean baseline metric over the
    common tasks (equal weight per task, not per example). ``"mean_of_ratios"`` is the mean
    of the per-task ratios. A zero baseline gives NaN.
    """
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric must be 'acc' or 'acc_norm', got {metric!r}")
    tasks = [t for t in baseline if t in candidate]
    if not tasks:
        raise ValueError("candidate and baseline have no task in common")
    cand = [_metric_value(candidate[t], metric) for t in tasks]
    base = [_metric_value(baseline[t], metric) for t in tasks]
    out = {t: _ratio(c, b) for t, c, b in zip(tasks, cand, base, strict=True)}
    ratios = [out[t] for t in tasks]
    out["average"] = _ratio(sum(cand), sum(base))
    out["mean_of_ratios"] = sum(ratios) / len(ratios)
    return out
