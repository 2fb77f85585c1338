"""lm-eval adapter: lm-eval through ``lp-deploy`` agrees exactly with ``benchmarks/qa.py``.

lm-eval runs its own task definitions (its ``super_glue/copa/default.yaml`` and
``arc/arc_easy.yaml``, included by path) with the dataset swapped for the local files of
``$LP_DEPLOY_DATA_DIR`` through the ``json`` builder, offline. Skipped without lm-eval
(``pip install -e '.[lmeval]'``) or without the QA data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed: pip install -e '.[lmeval]' (make installs it)"
)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lp_deploy.benchmarks import qa  # noqa: E402
from lp_deploy.benchmarks.lm_eval_adapter import (  # noqa: E402
    AUTO_BATCH_SIZE,
    LpDeployLM,
    cut_at_stop,
    main,
    parse_batch_size,
    torch_device,
)
from lp_deploy.data import default_data_dir  # noqa: E402
from lp_deploy.errors import LpDeployError  # noqa: E402
from lp_deploy.runtimes.base import Runtime  # noqa: E402
from lp_deploy.runtimes.batching import Past  # noqa: E402
from lp_deploy.runtimes.torch_runtime import TorchRuntime  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
LOCAL_TASKS = {"copa": "lpd_copa", "arc_easy": "lpd_arc_easy"}  # our name -> lm-eval task
SENTENCE = "the city of the river was built in the early year , and the old church"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access: datasets reads only the local json files."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)


@pytest.fixture(scope="module")
def qa_dir() -> Path:
    path: Path = default_data_dir()
    needed = ("copa/val.jsonl", "arc/ARC-Easy-Test.jsonl")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        pytest.skip(f"QA data not found in {path} ({', '.join(missing)}); set LP_DEPLOY_DATA_DIR")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _arc_hf_row(row: dict[str, Any]) -> dict[str, Any]:
    """An ARC line of the AI2 release as a row of the Hugging Face ``allenai/ai2_arc``."""
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
    }


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory, qa_dir: Path) -> TaskManager:
    """lm-eval's own copa / arc_easy definitions over the local files (tasks ``lpd_*``)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    copa = _write_jsonl(root / "copa.jsonl", _read_jsonl(qa_dir / "copa/val.jsonl"))
    arc_rows = _read_jsonl(qa_dir / "arc/ARC-Easy-Test.jsonl")
    arc = _write_jsonl(root / "arc_easy.jsonl", [_arc_hf_row(r) for r in arc_rows])
    cache = root / "hf_datasets_cache"
    (root / "lpd_copa.yaml").write_text(
        f"include: {LM_EVAL_TASKS / 'super_glue/copa/default.yaml'}\n"
        "task: lpd_copa\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{validation: '{copa}'}}, cache_dir: '{cache}'}}\n"
        "training_split: null\n"
    )
    (root / "lpd_arc_easy.yaml").write_text(
        f"include: {LM_EVAL_TASKS / 'arc/arc_easy.yaml'}\n"
        "task: lpd_arc_easy\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{test: '{arc}'}}, cache_dir: '{cache}'}}\n"
        "training_split: null\n"
        "validation_split: null\n"
    )
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture
def tiny_runtime(tiny_model: Callable[..., Any], tokenizer: Any) -> TorchRuntime:
    return TorchRuntime(tiny_model("llama"), tokenizer)


# --------------------------------------------------------------------------- helpers


def _run_lm_eval(lm: LpDeployLM, tm: TaskManager, task: str, limit: int | None) -> dict[str, Any]:
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=tm, limit=limit, bootstrap_iters=0, log_samples=True
    )
    assert out is not None
    return dict(out)


def _compare_with_qa(
    name: str,
    rt: TorchRuntime,
    batch_size: int,
    tm: TaskManager,
    qa_dir: Path,
    limit: int | None,
) -> tuple[qa.TaskResult, dict[str, Any]]:
    """Run ``name`` both ways; assert identical requests, log-likelihoods and accuracies."""
    task = LOCAL_TASKS[name]
    out = _run_lm_eval(LpDeployLM(runtime=rt, batch_size=batch_size), tm, task, limit)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lm_args = [tuple(a) for s in samples for a in s["arguments"]]
    lm_lls = [float(r[0][0]) for s in samples for r in s["resps"]]

    qa_lls: list[float] = []

    def loglikelihood(requests: Sequence[qa.Request]) -> list[float]:
        pairs = [(r.context, r.continuation) for r in requests]
        lls = [ll for ll, _ in rt.loglikelihood(pairs, batch_size, shared_context=False)]
        qa_lls.extend(lls)
        return lls

    result = qa.evaluate_task(name, loglikelihood, qa_dir, limit=limit, progress=False)
    examples = qa.load_task(name, qa_dir, limit)
    assert lm_args == [(r.context, r.continuation) for ex in examples for r in ex.requests]
    assert lm_lls == qa_lls
    metrics = out["results"][task]
    assert metrics["acc,none"] == pytest.approx(result.acc, abs=1e-12)
    if result.acc_norm is not None:
        assert metrics["acc_norm,none"] == pytest.approx(result.acc_norm, abs=1e-12)
    return result, metrics


def _rolling_reference(model: Any, ids: Sequence[int], prefix: int, window: int) -> float:
    """Sum of log p(token) over disjoint windows of ``window`` predictions, written anew:
    window ``[start, end)`` is predicted from the ``window`` tokens of ``[prefix, *ids]``
    that end just before ``end``."""
    seq = [prefix, *ids]
    total = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        inp = seq[max(0, end - window) : end]
        with torch.no_grad():
            logits = model(torch.tensor([inp])).logits[0].float()
        logprobs = torch.log_softmax(logits[-(end - start) :], dim=-1)
        target = torch.tensor(ids[start:end])
        total += float(logprobs.gather(-1, target[:, None]).sum())
    return total


def _instance(kind: str, args: tuple[Any, ...]) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


# --------------------------------------------------------------------------- tiny model


@pytest.mark.parametrize("name", list(LOCAL_TASKS))
def test_lm_eval_matches_qa_scorer(
    name: str, tiny_runtime: TorchRuntime, task_manager: TaskManager, qa_dir: Path
) -> None:
    """Same prompts, bit-identical log-likelihoods and the same acc (and acc_norm)."""
    limit = 24 if name == "copa" else 12
    _compare_with_qa(name, tiny_runtime, 4, task_manager, qa_dir, limit)


def test_rolling_loglikelihood_windows(tiny_model: Callable[..., Any], tokenizer: Any) -> None:
    """Perplexity requests: one window when the text fits, disjoint windows otherwise."""
    model = tiny_model("llama")
    rt = TorchRuntime(model, tokenizer)
    text = f"{SENTENCE} . {SENTENCE}"
    ids = rt.encode(text)
    prefix = int(tokenizer.bos_token_id)
    assert len(ids) > 20
    for window, batch_size in ((None, 1), (8, 1), (8, 3), (len(ids), 2)):
        lm = LpDeployLM(runtime=rt, batch_size=batch_size, max_length=window)
        requests = [_instance("loglikelihood_rolling", (t,)) for t in (text, "the city", "")]
        got = lm.loglikelihood_rolling(requests)
        size = window or rt.max_length
        want = [_rolling_reference(model, rt.encode(t), prefix, size) for t in (text, "the city")]
        assert got[:2] == pytest.approx(want, abs=1e-4), (window, batch_size)
        assert got[2] == 0.0
    # one window: the runtime's own token-level score of the whole text after BOS
    whole = rt.loglikelihood_tokens([([prefix], ids)])[0][0]
    one = LpDeployLM(runtime=rt).loglikelihood_rolling(
        [_instance("loglikelihood_rolling", (text,))]
    )
    assert one[0] == pytest.approx(whole, abs=1e-6)


def test_generate_until(tiny_runtime: TorchRuntime) -> None:
    """Greedy text of the runtime, cut at the stop strings; max_gen_toks and its aliases."""
    rt = tiny_runtime
    lm = LpDeployLM(runtime=rt, max_gen_toks=5)
    prompt = rt.encode(SENTENCE)
    full = rt.decode(rt.generate(prompt, max_new_tokens=40))
    words = full.split()
    assert len(words) >= 8, full  # the tiny model does not stop early on EOS
    stop = f" {words[6]} "
    expected_cut = full.split(stop)[0]

    requests = [
        _instance("generate_until", (SENTENCE, {"until": [], "max_gen_toks": 40})),
        _instance("generate_until", (SENTENCE, {"until": [], "max_new_tokens": 40})),
        _instance(
            "generate_until", (SENTENCE, {"until": [stop, "no such text"], "max_gen_toks": 40})
        ),
        _instance("generate_until", (SENTENCE, {"until": stop, "do_sample": False})),
        _instance("generate_until", (SENTENCE, {})),  # the adapter's max_gen_toks (5)
    ]
    got = lm.generate_until(requests)
    assert got[0] == got[1] == full
    assert got[2] == expected_cut and len(expected_cut) < len(full)
    assert got[3] == cut_at_stop(rt.decode(rt.generate(prompt, max_new_tokens=5)), [stop])
    assert got[4] == rt.decode(rt.generate(prompt, max_new_tokens=5))
    # sampling is passed through and seeded
    sampled = _instance("generate_until", (SENTENCE, {"until": [], "temperature": 1.0, "seed": 3}))
    assert lm.generate_until([sampled]) == lm.generate_until([sampled])
    with pytest.raises(LpDeployError, match="below the context window"):
        lm.generate_until([_instance("generate_until", (SENTENCE, {"max_gen_toks": 10**6}))])


class _ForwardOnly(Runtime):
    """A third-party runtime: only ``forward`` (and the attributes) of the interface."""

    name = "forward-only"

    def __init__(self, rt: TorchRuntime) -> None:
        self._rt = rt
        self.tokenizer = rt.tokenizer
        self.max_length = rt.max_length
        self.eos_token_ids = rt.eos_token_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None = None,
    ) -> tuple[torch.Tensor, Past]:
        return self._rt.forward(input_ids, attention_mask, position_ids, past)


def test_runtime_implementing_only_forward(tiny_runtime: TorchRuntime) -> None:
    """The interface gives a runtime that implements ``forward`` everything lm-eval needs."""
    requests = [("the city of", " the river"), ("the city ", "of the"), ("", "the city")]
    want = tiny_runtime.loglikelihood(requests, batch_size=2)
    lm = LpDeployLM(runtime=_ForwardOnly(tiny_runtime), batch_size=2)
    got = lm.loglikelihood([_instance("loglikelihood", r) for r in requests])
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
    rolling = [_instance("loglikelihood_rolling", (SENTENCE,))]
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(
        LpDeployLM(runtime=tiny_runtime).loglikelihood_rolling(rolling), abs=1e-5
    )
    with pytest.raises(LpDeployError, match=r"subclass of lp_deploy\.runtimes\.Runtime"):
        LpDeployLM(runtime=object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- construction


def test_registered_and_built_from_model_args(tiny_model_dir: Path, tokenizer: Any) -> None:
    """``--model lp-deploy --model_args artifact=DIR,runtime=torch,...`` builds the runtime."""
    from lm_eval.api.registry import get_model, model_registry

    cls = get_model("lp-deploy")
    assert cls is LpDeployLM
    assert "hf" in model_registry  # lm-eval's own models stay registered
    lm = cls.create_from_arg_string(
        f"artifact={tiny_model_dir},runtime=torch,dtype=fp32,batch_size=auto,max_gen_toks=7",
        {"device": "cpu", "max_batch_size": None},
    )
    assert isinstance(lm.runtime, TorchRuntime)
    assert lm.batch_size == AUTO_BATCH_SIZE and lm.max_gen_toks == 7
    assert lm.get_model_info()["lp_deploy_runtime"] == "torch"
    in_memory = TorchRuntime.from_artifact(tiny_model_dir)
    request = ("the city of", " the river")
    got = lm.loglikelihood([_instance("loglikelihood", request)])
    assert got == in_memory.loglikelihood([request])


def test_construction_errors(tiny_runtime: TorchRuntime, tiny_model_dir: Path) -> None:
    with pytest.raises(LpDeployError, match="artifact=DIR"):
        LpDeployLM()
    with pytest.raises(LpDeployError, match="drop artifact"):
        LpDeployLM(artifact=tiny_model_dir, runtime=tiny_runtime)
    with pytest.raises(LpDeployError, match="unknown runtime"):
        LpDeployLM(artifact=tiny_model_dir, runtime="nope")
    with pytest.raises(LpDeployError, match="runtime must be"):
        LpDeployLM(runtime=object())
    with pytest.raises(LpDeployError, match="max_gen_toks"):
        LpDeployLM(runtime=tiny_runtime, max_gen_toks=0)


def test_command_line(
    tiny_model_dir: Path, task_manager: TaskManager, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m lp_deploy.benchmarks.lm_eval_adapter`` is lm-eval's CLI with the model
    registered; its default ``--device cuda:0`` falls back to cpu without CUDA."""
    main(
        [
            "run",
            *("--model", "lp-deploy", "--tasks", "lpd_copa", "--limit", "2"),
            *("--model_args", f"artifact={tiny_model_dir},runtime=torch"),
            *("--include_path", str(task_manager.include_path)),
        ]
    )
    table = capsys.readouterr().out
    assert "lpd_copa" in table and "acc" in table


def test_torch_device() -> None:
    assert torch_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert torch_device("cuda:0") == "cpu"


@pytest.mark.parametrize(
    ("value", "cap", "expected"),
    [
        (None, None, 1),
        (3, None, 3),
        ("5", None, 5),
        ("auto", None, AUTO_BATCH_SIZE),
        ("auto:4", 2, 2),
    ],
)
def test_parse_batch_size(value: Any, cap: int | None, expected: int) -> None:
    assert parse_batch_size(value, cap) == expected


@pytest.mark.parametrize("value", [0, "-1", "big"])
def test_parse_batch_size_rejects(value: Any) -> None:
    with pytest.raises(LpDeployError, match="batch_size"):
        parse_batch_size(value)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_copa_lm_eval_agrees_with_qa_scorer(
    smollm2: Any, task_manager: TaskManager, qa_dir: Path
) -> None:
    """Acceptance: dense SmolLM2-135M, COPA (first 50 items, to bound CI time; the full set
    was measured for the README): lm-eval through the adapter and our scorer agree within
    0.5 pt (in fact exactly, request by request)."""
    rt = TorchRuntime(smollm2.model, smollm2.tokenizer)
    result, metrics = _compare_with_qa("copa", rt, 8, task_manager, qa_dir, 50)
    assert result.n == 50
    assert math.isclose(metrics["acc,none"], result.acc, abs_tol=0.005)
