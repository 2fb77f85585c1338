"""In-flight batching: concurrent generation requests decoded together by one runtime.

Waiting requests are prefilled together (left-padded; a lone one exactly as
:meth:`Runtime.stream` does) and join the running batch at the next decode step; a finished or
cancelled one leaves it. Each sequence keeps its own KV cache; a decode step left-pads the
caches to the longest one, masks the padding (``attention_mask``) and gives each row its own
position, so a row computes what it would alone (up to floating-point summation order). Decode
is memory-bound: one step for 8 sequences reads the weights once, not 8 times — that is where
the throughput comes from.

Sampling, the text of each token and the context check are lp-deploy's own
(:func:`next_token`, :class:`TextDeltas`, :meth:`Runtime.check_length`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Past, Runtime
from lp_deploy.runtimes.base import SamplingConfig, TextDeltas, next_token
from lp_deploy.runtimes.batching import pad_batch, positions_from_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request (the generate model's inputs, checked)."""

    text: str
    max_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False


class Sink(Protocol):
    """Where a request's results go (a Triton response sender, a test's list...)."""

    def token(self, token_id: int, text: str) -> None:
        """A new token and the text it adds (may be empty while a character is incomplete)."""

    def finish(self, token_ids: list[int], text: str, tail: str) -> None:
        """Done: every token, the whole text, and the text not yet given to :meth:`token`."""

    def fail(self, message: str) -> None:
        """The request failed (or was cancelled) with ``message``."""

    def cancelled(self) -> bool:
        """Whether the client has gone (the sequence then leaves the batch)."""


def _scalar(inputs: Mapping[str, Any], name: str) -> Any:
    value = inputs.get(name)
    if value is None:
        return None
    items = list(value.reshape(-1)) if hasattr(value, "reshape") else [value]
    if len(items) != 1:
        raise LpDeployError(f"input {name!r} must hold one value, got {len(items)}")
    item = items[0]
    return item.item() if hasattr(item, "item") else item


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LpDeployError(f"input {name!r} is not UTF-8 text") from exc
    return str(value)


def parse_request(inputs: Mapping[str, Any], default_max_tokens: int = 32) -> GenerateRequest:
    """A :class:`GenerateRequest` from the generate model's input arrays (absent: None);
    a clear :class:`LpDeployError` for a missing prompt or a value out of range.

    Greedy unless ``temperature`` (> 0), ``top_k`` (> 0) or ``top_p`` (< 1) asks to sample;
    an explicit ``temperature`` of 0 is greedy whatever ``top_k`` and ``top_p`` say (as in vLLM
    and TensorRT-LLM).
    """
    raw = _scalar(inputs, "text_input")
    if raw is None:
        raise LpDeployError("input 'text_input' is required: the prompt text")
    text = _text(raw, "text_input")
    if not text:
        raise LpDeployError("input 'text_input' is empty: give a prompt")
    max_tokens = _scalar(inputs, "max_tokens")
    max_tokens = default_max_tokens if max_tokens is None else int(max_tokens)
    if max_tokens < 1:
        raise LpDeployError(f"max_tokens must be >= 1, got {max_tokens}")
    temperature = _scalar(inputs, "temperature")
    top_k = _scalar(inputs, "top_k")
    top_p = _scalar(inputs, "top_p")
    sample = bool(temperature != 0) and bool(
        (temperature is not None and temperature > 0)
        or (top_k is not None and top_k > 0)
        or (top_p is not None and top_p < 1)
    )
    try:
        sampling = SamplingConfig(
            sample,
            float(temperature) if temperature else 1.0,
            int(top_k or 0),
            1.0 if top_p is None else float(top_p),
        )
    except ValueError as exc:
        raise LpDeployError(str(exc)) from exc
    stops = inputs.get("stop")
    stop = tuple(_text(s, "stop") for s in stops.reshape(-1)) if stops is not None else ()
    seed = _scalar(inputs, "seed")
    stream = _scalar(inputs, "stream")
    return GenerateRequest(
        text,
        max_tokens,
        sampling,
        None if seed is None else int(seed),
        tuple(s for s in stop if s),
        bool(stream),
    )


@dataclass
class _Sequence:
    request: GenerateRequest
    sink: Sink
    deltas: TextDeltas
    generator: torch.Generator | None
    stops: frozenset[int]
    past: Past = field(default_factory=list)
    length: int = 0  # tokens in the KV cache
    last: int = -1  # the token to feed next
    produced: int = 0
    done: bool = False
    shown: str = ""  # the text given to the sink's token(): never the start of a stop string


class BatchEngine:
    """Decodes the active requests together, one token per step, on one runtime.

    ``submit`` checks a request (a clear error at once) and queues it; a background thread
    (``start``) or the caller (``step``) runs the steps. At most ``max_batch`` sequences are
    active; the others wait in order.
    """

    def __init__(self, runtime: Runtime, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise LpDeployError(f"max_batch must be >= 1, got {max_batch}")
        self.runtime = runtime
        self.max_batch = max_batch
        self._waiting: deque[tuple[_Sequence, list[int]]] = deque()
        self._active: list[_Sequence] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self.max_active = 0  # the largest batch decoded together

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerateRequest, sink: Sink) -> None:
        """Queue ``request``; :class:`LpDeployError` when it cannot fit the context."""
        rt = self.runtime
        ids = list(rt.tokenizer(request.text)["input_ids"])
        if not ids:
            raise LpDeployError("the prompt tokenizes to nothing: give some text")
        rt.check_length(len(ids), request.max_tokens)
        seed = request.seed
        seq = _Sequence(
            request,
            sink,
            TextDeltas(rt.decode),
            torch.Generator().manual_seed(seed) if seed is not None else None,
            frozenset(rt.eos_token_ids),
        )
        with self._cond:
            self._waiting.append((seq, ids))
            self._cond.notify()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._active)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Run the steps on a background thread until :meth:`stop` (once: a second call while
        it runs does nothing)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lp-deploy-batch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and fail the requests not answered yet; a step still running after
        ``timeout`` s fails them itself when it ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("a generation step still runs after %.0f s: it ends the rest", timeout)
                return
        self._fail_all()

    def _fail_all(self) -> None:
        with self._cond:
            seqs = self._active + [s for s, _ in self._waiting]
            self._active, self._waiting = [], deque()
        self._fail(seqs, "the model is being unloaded")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
            self.step()
        self._fail_all()

    def step(self) -> None:
        """Admit waiting requests (prefill), then one decode step for every active one."""
        try:
            self._admit()
            self._drop_finished()
            if self._active:
                self._decode()
                self._drop_finished()
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("generation step failed")
            with self._cond:
                failed, self._active = self._active, []
            self._fail(failed, f"generation failed: {exc}")

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, together (left-padded) when several."""
        new: list[tuple[_Sequence, list[int]]] = []
        with self._cond:
            while self._waiting and len(self._active) + len(new) < self.max_batch:
                new.append(self._waiting.popleft())
        new = [(seq, ids) for seq, ids in new if not self._cancelled(seq)]
        if not new:
            return
        seqs = [seq for seq, _ in new]
        try:
            pad = self.runtime.tokenizer.pad_token_id
            rows = [i for _, i in new]
            ids, mask, offsets = pad_batch(rows, 0 if pad is None else int(pad), "left")
            logits, present = self.runtime.forward(ids, mask, positions_from_mask(mask))
        except Exception as exc:  # popped from the queue: they are answered here or never
            log.exception("prefill failed")
            self._fail(seqs, f"generation failed: {exc}")
            return
        with self._cond:
            self._active.extend(seqs)  # from here on, step() fails them if anything raises
        for row, (seq, prompt) in enumerate(new):
            seq.past = _row(present, row, offsets[row])
            seq.length = len(prompt)
        for row, seq in enumerate(seqs):
            self._emit(seq, logits[row, -1])

    def _decode(self) -> None:
        active = self._active
        self.steps += 1
        self.max_active = max(self.max_active, len(active))
        width = max(s.length for s in active)
        mask = torch.zeros(len(active), width + 1, dtype=torch.long)
        for row, seq in enumerate(active):
            mask[row, width - seq.length :] = 1
        past = _left_pad([s.past for s in active], [s.length for s in active], width)
        logits, present = self.runtime.forward(
            torch.tensor([[s.last] for s in active]),
            mask,
            torch.tensor([[s.length] for s in active]),
            past,
        )
        for row, seq in enumerate(active):
            seq.past = _row(present, row, width - seq.length)
            seq.length += 1
            self._emit(seq, logits[row, -1])

    # ------------------------------------------------------------------ per sequence

    def _emit(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Pick the next token of ``seq``, hand it to its sink, and see whether it is done.

        The text ends where a stop string begins; text that may be the start of one is held
        back until the next tokens tell."""
        token = next_token(logits, seq.request.sampling, seq.generator)
        seq.produced += 1
        seq.last = token
        seq.deltas.push(token)
        stops = seq.request.stop
        text, stopped = _until_stop(seq.deltas.sent, stops)
        shown = text if stopped else text[: len(text) - _held_back(text, stops)]
        delta, seq.shown = shown[len(seq.shown) :], shown
        if not self._safe(seq, lambda s: s.sink.token(token, delta)):
            return
        if stopped or token in seq.stops or seq.produced >= seq.request.max_tokens:
            if not stopped:
                seq.deltas.finish()  # an incomplete character's bytes, as they are
                text, _ = _until_stop(seq.deltas.sent, stops)
            tail = text[len(seq.shown) :]
            seq.done = True
            self._safe(seq, lambda s: s.sink.finish(list(s.deltas.ids), text, tail))

    def _cancelled(self, seq: _Sequence) -> bool:
        cancelled = False
        try:
            cancelled = seq.sink.cancelled()
        except Exception:  # a sink that cannot tell has lost its client
            cancelled = True
        if cancelled:
            seq.done = True
            self._safe(seq, lambda s: s.sink.fail("the request was cancelled"))
        return cancelled

    def _fail(self, seqs: Sequence[_Sequence], message: str) -> None:
        """Fail every sequence of ``seqs`` not answered yet."""
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._safe(seq, lambda s: s.sink.fail(message))

    def _safe(self, seq: _Sequence, call: Any) -> bool:
        """Call the sink; a sink that raises (the client went away) ends the sequence."""
        try:
            call(seq)
            return True
        except Exception as exc:
            log.info("dropping a request whose client is gone: %s", exc)
            seq.done = True
            return False

    def _drop_finished(self) -> None:
        kept = [s for s in self._active if not s.done and not self._cancelled(s)]
        with self._cond:
            self._active = kept


def _row(present: Past, row: int, start: int) -> Past:
    """Row ``row``'s cache from ``start`` on (its left padding dropped)."""
    return [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in present]


def _left_pad(pasts: Sequence[Past], lengths: Sequence[int], width: int) -> Past:
    """Per-layer caches of every sequence, left-padded with zeros to ``width`` positions."""
    layers = len(pasts[0])
    out: Past = []
    for layer in range(layers):
        pair = []
        for which in (0, 1):
            first = pasts[0][layer][which]
            shape = (len(pasts), first.shape[1], width, first.shape[3])
            full = torch.zeros(shape, dtype=first.dtype, device=first.device)
            for row, (past, n) in enumerate(zip(pasts, lengths, strict=True)):
                full[row, :, width - n :] = past[layer][which][0]
            pair.append(full)
        out.append((pair[0], pair[1]))
    return out


def _until_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to where the first stop string begins, and whether one occurs."""
    found = [text.find(s) for s in stops if s and s in text]
    return (text[: min(found)], True) if found else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string (0: none)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
