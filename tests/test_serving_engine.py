"""In-flight batching engine (no server): batched answers equal single-request answers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Past, Runtime, create_runtime
from lp_deploy.runtimes.base import SamplingConfig
from lp_deploy.serving.engine import BatchEngine, GenerateRequest, parse_request

PROMPTS = [
    "the cat sat on the mat",
    "a dog",
    "the history of the river valley begins with the first farming villages",
    "water",
    "the old church",
    "the mills closed and the buildings were converted into housing",
]


class ListSink:
    def __init__(self, cancel_after: int | None = None, raise_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.result: tuple[list[int], str, str] | None = None
        self.error: str | None = None
        self.cancel_after = cancel_after
        self.raise_after = raise_after

    def token(self, token_id: int, text: str) -> None:
        if self.raise_after is not None and len(self.tokens) >= self.raise_after:
            raise ConnectionError("client gone")
        self.tokens.append(token_id)
        self.pieces.append(text)

    def finish(self, token_ids: list[int], text: str, tail: str) -> None:
        self.result = (token_ids, text, tail)

    def fail(self, message: str) -> None:
        self.error = message

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after


class ScriptTokenizer:
    pad_token_id = 0

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.index(w) for w in text.split()]}


class ScriptRuntime(Runtime):
    """No model: token ``i`` is followed by token ``i + 1`` (the vocabulary is the script),
    decoding joins the pieces; ``fail_prefill`` makes a prefill (no past) raise."""

    name = "script"
    max_length = 64

    def __init__(self, vocab: list[str]) -> None:
        self.tokenizer = ScriptTokenizer(vocab)
        self.vocab = vocab
        self.fail_prefill = False
        self.gate: threading.Event | None = None  # forward waits for it when set
        self.entered = threading.Event()  # forward was called

    def decode(self, ids: Any) -> str:
        return "".join(self.vocab[i] for i in ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None = None,
    ) -> tuple[torch.Tensor, Past]:
        if past is None and self.fail_prefill:
            raise RuntimeError("prefill exploded")
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        logits = torch.nn.functional.one_hot((input_ids + 1) % len(self.vocab), len(self.vocab))
        new = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 1)
        kv = new if past is None else torch.cat([past[0][0], new], 2)
        return logits.float(), [(kv, kv)]


SCRIPT = ["<pad>", "x", "a", "ri", "ver", "s", " end"]


@pytest.fixture(scope="module")
def runtime(tiny_export: Path) -> Runtime:
    return create_runtime("onnxruntime", tiny_export, threads=1)


def run(engine: BatchEngine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_one_request_equals_runtime_generate(runtime: Runtime) -> None:
    engine = BatchEngine(runtime, max_batch=4)
    sink = ListSink()
    engine.submit(GenerateRequest(PROMPTS[0], max_tokens=20), sink)
    run(engine)
    want = runtime.generate(PROMPTS[0], max_new_tokens=20)
    assert sink.result is not None and sink.result[0] == want == sink.tokens
    assert sink.result[1] == runtime.decode(want) == "".join(sink.pieces) + sink.result[2]


def test_concurrent_requests_are_decoded_together_and_equal_alone(runtime: Runtime) -> None:
    engine = BatchEngine(runtime, max_batch=4)
    lengths = [24, 5, 17, 30, 12, 9]
    sinks = [ListSink() for _ in PROMPTS]
    for i, (prompt, sink) in enumerate(zip(PROMPTS, sinks, strict=True)):
        engine.submit(GenerateRequest(prompt, max_tokens=lengths[i]), sink)
        if i == 3:  # the later ones join a running batch
            engine.step()
            engine.step()
    run(engine)
    assert engine.max_active == 4  # bounded by max_batch, and really batched
    for prompt, n, sink in zip(PROMPTS, lengths, sinks, strict=True):
        want = runtime.generate(prompt, max_new_tokens=n)
        assert sink.result is not None and sink.result[0] == want, prompt
    total = sum(len(s.tokens) for s in sinks)
    assert engine.steps < total  # far fewer decode steps than tokens


def test_seeded_sampling_equals_runtime_stream(runtime: Runtime) -> None:
    engine = BatchEngine(runtime)
    sampling = SamplingConfig(True, 0.8, 20, 0.9)
    sinks = [ListSink(), ListSink()]
    engine.submit(GenerateRequest(PROMPTS[0], 16, sampling, seed=7), sinks[0])
    engine.submit(GenerateRequest(PROMPTS[1], 16, sampling, seed=7), sinks[1])
    run(engine)
    for prompt, sink in zip(PROMPTS[:2], sinks, strict=True):
        want = runtime.generate(prompt, 16, True, 0.8, 20, 0.9, seed=7)
        assert sink.tokens == want


def test_stop_string_ends_the_text(runtime: Runtime) -> None:
    full = runtime.decode(runtime.generate(PROMPTS[2], max_new_tokens=20))
    words = full.split()
    assert len(words) > 3
    stop = words[2]
    engine = BatchEngine(runtime)
    sink = ListSink()
    engine.submit(GenerateRequest(PROMPTS[2], 20, stop=(stop,)), sink)
    run(engine)
    assert sink.result is not None
    assert stop not in sink.result[1] and full.startswith(sink.result[1])
    assert len(sink.tokens) < 20


def test_cancelled_and_vanished_clients_leave_the_batch(runtime: Runtime) -> None:
    engine = BatchEngine(runtime, max_batch=3)
    gone, cancelled, kept = ListSink(raise_after=3), ListSink(cancel_after=2), ListSink()
    for sink in (gone, cancelled, kept):
        engine.submit(GenerateRequest(PROMPTS[0], max_tokens=20), sink)
    run(engine)
    assert len(gone.tokens) == 3 and gone.result is None
    assert cancelled.error == "the request was cancelled" and len(cancelled.tokens) == 2
    assert kept.result is not None and kept.result[0] == runtime.generate(PROMPTS[0], 20)


def test_requests_beyond_the_context_are_refused(runtime: Runtime) -> None:
    engine = BatchEngine(runtime)
    with pytest.raises(LpDeployError, match="context of 256 tokens"):
        engine.submit(GenerateRequest(PROMPTS[0], max_tokens=300), ListSink())
    assert not engine.busy


def test_the_background_thread_answers(runtime: Runtime) -> None:
    engine = BatchEngine(runtime)
    engine.start()
    try:
        sink = ListSink()
        engine.submit(GenerateRequest(PROMPTS[1], max_tokens=8), sink)
        import time

        deadline = time.monotonic() + 30
        while sink.result is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert sink.result is not None and sink.result[0] == runtime.generate(PROMPTS[1], 8)


def arr(value: Any, dtype: Any) -> np.ndarray:
    return np.array([value], dtype=dtype)


def test_parse_request() -> None:
    req = parse_request({"text_input": arr(b"hi", object)}, default_max_tokens=9)
    assert req == GenerateRequest("hi", 9)
    req = parse_request(
        {
            "text_input": arr(b"hi", object),
            "max_tokens": arr(4, np.int32),
            "stream": arr(True, bool),
            "temperature": arr(0.5, np.float32),
            "seed": arr(3, np.uint64),
            "stop": np.array([b".", b""], dtype=object),
        }
    )
    assert req.stream and req.max_tokens == 4 and req.seed == 3 and req.stop == (".",)
    assert req.sampling.do_sample and req.sampling.temperature == 0.5
    greedy = parse_request({"text_input": arr(b"hi", object), "temperature": arr(0, np.float32)})
    assert not greedy.sampling.do_sample
    for extra in ({"top_k": arr(5, np.int32)}, {"top_p": arr(0.5, np.float32)}):
        inputs = {"text_input": arr(b"hi", object), "temperature": arr(0, np.float32), **extra}
        assert not parse_request(inputs).sampling.do_sample  # 0 is greedy, not temperature 1
    sampled = parse_request({"text_input": arr(b"hi", object), "top_k": arr(5, np.int32)})
    assert sampled.sampling.do_sample and sampled.sampling.temperature == 1.0
    for bad, match in [
        ({}, "text_input' is required"),
        ({"text_input": arr(b"", object)}, "empty"),
        ({"text_input": arr(b"x", object), "max_tokens": arr(0, np.int32)}, "max_tokens must be"),
        ({"text_input": arr(b"x", object), "top_p": arr(1.5, np.float32)}, "top_p"),
        ({"text_input": arr(b"x", object), "temperature": arr(-1, np.float32)}, "temperature"),
        ({"text_input": np.array([b"a", b"b"], dtype=object)}, "one value"),
    ]:
        with pytest.raises(LpDeployError, match=match):
            parse_request(bad)


def test_a_failed_prefill_answers_its_requests_and_spares_the_others() -> None:
    rt = ScriptRuntime(SCRIPT)
    engine = BatchEngine(rt, max_batch=4)
    running = ListSink()
    engine.submit(GenerateRequest("x", max_tokens=4), running)
    engine.step()  # prefilled: decoding
    rt.fail_prefill = True
    failed = [ListSink(), ListSink()]
    for sink in failed:
        engine.submit(GenerateRequest("x a", max_tokens=4), sink)
    run(engine)
    for sink in failed:
        assert sink.error is not None and "prefill exploded" in sink.error
        assert sink.result is None and not sink.tokens
    assert running.error is None and running.result is not None
    assert running.result[1] == "arivers" and not engine.busy


@pytest.mark.parametrize(
    ("stop", "max_tokens", "pieces", "text"),
    [
        ("river", 5, ["a", "", ""], "a"),  # "ri" + "ver": cut, and "ri" never streamed
        ("rivet", 4, ["a", "", "rive", "rs"], "arivers"),  # held back, then released
        ("river", 2, ["a", ""], "ari"),  # the held-back "ri" comes with the end
        ("ver", 5, ["a", "ri", ""], "ari"),
        ("s end", 9, ["a", "ri", "ver", "", ""], "ariver"),  # "s" alone is held back
    ],
)
def test_stop_strings_spanning_tokens_are_cut_and_never_streamed(
    stop: str, max_tokens: int, pieces: list[str], text: str
) -> None:
    engine = BatchEngine(ScriptRuntime(SCRIPT))
    sink = ListSink()
    engine.submit(GenerateRequest("x", max_tokens, stop=(stop,), stream=True), sink)
    run(engine)
    assert sink.result is not None and sink.pieces == pieces and sink.result[1] == text
    assert "".join(sink.pieces) + sink.result[2] == text


def test_start_twice_runs_one_loop_and_stop_waits_for_a_running_step() -> None:
    rt = ScriptRuntime(SCRIPT)
    rt.gate = threading.Event()
    engine = BatchEngine(rt)
    engine.start()
    thread = engine._thread
    engine.start()
    assert engine._thread is thread
    sink = ListSink()
    engine.submit(GenerateRequest("x", max_tokens=50), sink)
    assert rt.entered.wait(10)
    engine.stop(timeout=0.2)  # the step is blocked in forward: stop leaves it be
    assert thread is not None and thread.is_alive() and sink.error is None
    rt.gate.set()
    thread.join(10)
    assert not thread.is_alive() and sink.error == "the model is being unloaded"
    assert not engine.busy
