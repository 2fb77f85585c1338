"""One interface for every runtime: ``forward`` with a KV cache, ``generate``, ``loglikelihood``.

A runtime only implements :meth:`Runtime.forward`; sampling, generation and
lm-eval-style log-likelihood scoring (with batching and padding) are written once here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.errors import LpDeployError

from .batching import Past, pad_batch, positions_from_mask
from .shared_context import WINDOW_BATCHES, WINDOW_CONTEXT_TOKENS, pack_runs, score_window

Prompt = str | Sequence[int] | torch.Tensor

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, runtime: str) -> torch.dtype | None:
    """``'fp32'|'fp16'|'bf16'`` (or a torch dtype) -> torch dtype; a clear error otherwise."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LpDeployError(
            f"dtype {dtype!r} is not supported by the {runtime} runtime; choose one of "
            f"{', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (``fp32``) of a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token (greedy unless ``do_sample``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_token(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float().reshape(-1).cpu()
    if not cfg.do_sample:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # mass before a token; keeps the top one
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextDeltas:
    """The text each new token adds to a generation, for streaming.

    ``push`` returns what the tokens so far add to the text already returned; text is held
    back while the tail is an incomplete character (U+FFFD) or while decoding the longer
    sequence changes text already returned. The pieces plus ``finish()`` join to the decoded
    whole wherever the tokenizer's decoding is prefix-stable (the held-back part otherwise).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.sent = ""

    def _advance(self, final: bool) -> str:
        text = self._decode(self.ids)
        if (not final and text.endswith("\ufffd")) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)


class Runtime(ABC):
    """What every runtime offers (PyTorch, ONNX Runtime, TensorRT), and every consumer (the
    bench, the lm-eval adapter, serving) types against.

    A runtime implements :meth:`forward` and sets ``tokenizer``, ``max_length`` (the context
    window) and ``eos_token_ids``; streaming, generation and lm-eval-style log-likelihood
    scoring (with batching and padding) are written once here.
    """

    name = "base"
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 2048
    padding_side: str = "right"
    eos_token_ids: tuple[int, ...] = ()

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None = None,
    ) -> tuple[torch.Tensor, Past]:
        """float32 logits ``[batch, seq, vocab]`` and the present KV cache (past + new)."""

    # ------------------------------------------------------------------ text helpers

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, torch.Tensor):
            ids = [int(i) for i in prompt.reshape(-1).tolist()]
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    # ------------------------------------------------------------------ generation

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a request that cannot fit the context window."""
        if max_new_tokens < 0:
            raise LpDeployError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_length:
            raise LpDeployError(
                f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's context of {self.max_length} tokens; ask for at most "
                f"{max(0, self.max_length - prompt_tokens)} new tokens or shorten the prompt"
            )

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """New token ids after ``prompt`` (text or ids, batch 1), yielded as they are made;
        greedy unless ``do_sample``; stops after a stop token (default: EOS)."""
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        stops = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = self._prompt_ids(prompt)
        n = len(ids)
        self.check_length(n, max_new_tokens)
        if max_new_tokens == 0:
            return
        logits, past = self.forward(
            torch.tensor([ids]), torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], None
        )
        for produced in range(1, max_new_tokens + 1):
            token = next_token(logits[0, -1], cfg, gen)
            yield token
            if token in stops or produced == max_new_tokens:
                return
            logits, past = self.forward(
                torch.tensor([[token]]),
                torch.ones(1, n + 1, dtype=torch.long),
                torch.tensor([[n]]),
                past,
            )
            n += 1

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """All of :meth:`stream`'s tokens."""
        return list(
            self.stream(
                prompt, max_new_tokens, do_sample, temperature, top_k, top_p, stop_token_ids, seed
            )
        )

    # ------------------------------------------------------------------ log-likelihood

    def context_token(self) -> int:
        """What an empty context becomes: BOS, else EOS (lm-eval's ``HFLM`` rule)."""
        tok = self.tokenizer
        for cand in (tok.bos_token_id, tok.eos_token_id, *self.eos_token_ids):
            if cand is not None:
                return int(cand)
        raise LpDeployError("an empty context needs a BOS or EOS token; the tokenizer has none")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing context spaces move to the continuation; the
        continuation ids are the tail of ``encode(context + continuation)``."""
        if not context:
            return [self.context_token()], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]],
        batch_size: int = 1,
        shared_context: bool = True,
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation tokens | context) and whether each is the argmax.

        ``shared_context``: requests with the same context (the choices of a multiple-choice
        item) run the context once and only their continuations on its KV cache
        (:meth:`loglikelihood_shared`); the others are scored whole, ``batch_size`` at a time.
        """
        pairs = [self.encode_pair(c, x) for c, x in requests]
        if shared_context:
            return self.loglikelihood_shared(pairs, batch_size)
        return self.loglikelihood_tokens(pairs, batch_size)

    def loglikelihood_shared(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 1
    ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood_tokens`, but runs of consecutive pairs with the same context
        ids (and no truncation) share one forward pass of the context; context passes batch across
        items up to 512 padded tokens, continuation passes ``batch_size`` continuations at a
        time (:mod:`.shared_context`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: dict[int, tuple[float, bool]] = {}
        singles: list[int] = []
        runs: list[list[int]] = []
        for group in self._context_groups(pairs):
            if len(group) > 1:
                runs.append(group)
            else:
                singles += group
        runs.sort(key=lambda run: -len(pairs[run[0]][0]))
        lengths = [len(pairs[run[0]][0]) for run in runs]
        rows = WINDOW_BATCHES * batch_size
        for window in pack_runs(runs, lengths, rows, WINDOW_CONTEXT_TOKENS):
            items = [(pairs[run[0]][0], [pairs[i][1] for i in run]) for run in window]
            scored = score_window(self.forward, items, batch_size)
            results.update(zip([i for run in window for i in run], scored, strict=True))
        if singles:
            plain = self.loglikelihood_tokens([pairs[i] for i in singles], batch_size)
            results.update(zip(singles, plain, strict=True))
        return [results[i] for i in range(len(pairs))]

    def _context_groups(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[list[int]]:
        """Indices of consecutive pairs with equal context ids (a pair that would be
        truncated to the context window, or has an empty side, stays alone)."""
        groups: list[list[int]] = []
        previous: tuple[int, ...] | None = None
        for i, (ctx, cont) in enumerate(pairs):
            fits = len(ctx) > 0 and len(cont) > 0 and len(ctx) + len(cont) <= self.max_length + 1
            key = tuple(ctx) if fits else None
            if key is not None and key == previous:
                groups[-1].append(i)
            else:
                groups.append([i])
            previous = key
        return groups

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 1
    ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` on token ids; longest first, padded on ``padding_side``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows: list[tuple[list[int], list[int]]] = []
        for ctx, cont in pairs:
            whole = [*ctx, *cont][-(self.max_length + 1) :]
            rows.append((whole[:-1], list(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            scored = self._score_batch([rows[i] for i in chunk])
            results.update(zip(chunk, scored, strict=True))
        return [results[i] for i in range(len(rows))]

    def _score_batch(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        pad = self.tokenizer.pad_token_id
        ids, mask, offsets = pad_batch(
            [inp for inp, _ in rows], 0 if pad is None else int(pad), self.padding_side
        )
        logits, _ = self.forward(ids, mask, positions_from_mask(mask), None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, (inp, cont) in enumerate(rows):
            if not cont:
                out.append((0.0, True))
                continue
            end = offsets[i] + len(inp)
            rows_lp = logprobs[i, end - len(cont) : end]
            target = torch.tensor(cont, device=rows_lp.device)
            total = float(rows_lp.gather(-1, target[:, None]).sum())
            greedy = bool((rows_lp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any | None) -> tuple[int, ...]:
    """EOS ids from the generation config (int or list), else the tokenizer."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
