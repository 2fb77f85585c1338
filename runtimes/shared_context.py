"""Shared-context scoring: the choices of a multiple-choice item share one pass of the context.

:meth:`Runtime.loglikelihood_shared` sorts the items by context length and takes them a window
at a time. In a window, the contexts run in right-padded batches (their log-probabilities for
each continuation's first token and their KV caches kept); then every continuation of two or
more tokens, longest first, runs ``cont[:-1]`` in batches on its own context's KV cache, the
caches of a batch stacked and left-padded to the longest (the padding slots masked; left, so
that each context's last token sits next to its continuation, as sliding windows require). Sorting
keeps the padding small, and batching across items keeps the matrix products large enough to
run near the CPU's peak (a 50-token context alone runs at about 2/3 of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .batching import Past, pad_batch, positions_from_mask

#: padded context tokens in one batched context pass: bounds its logits
#: (``[contexts, longest, vocab]``: 100 MB at SmolLM2's vocabulary)
SHARED_CONTEXT_TOKENS = 512
#: padded context tokens whose KV caches one window holds (SmolLM2 fp32: 46 KB per token)
WINDOW_CONTEXT_TOKENS = 8192
#: a window holds at most this many continuation batches
WINDOW_BATCHES = 32

Forward = Callable[..., tuple[torch.Tensor, Past]]
Scored = tuple[float, bool]  # sum of log-probs, whether every token is the argmax
Item = tuple[Sequence[int], Sequence[Sequence[int]]]  # context ids, its continuations' ids


@dataclass(frozen=True)
class CachedContext:
    """One context after its pass: log-probs of the next token and its KV cache (per layer
    ``(key, value)``, each ``[kv_heads, length, head_dim]``)."""

    first: torch.Tensor
    past: Past

    @property
    def length(self) -> int:
        return int(self.past[0][0].shape[1])

    def score_first(self, token: int) -> Scored:
        """Log-prob of a continuation's first token and whether it is the argmax."""
        return float(self.first[token]), int(self.first.argmax()) == token


def pack_runs(
    runs: Sequence[list[int]], lengths: Sequence[int], rows: int, tokens: int
) -> list[list[list[int]]]:
    """Consecutive ``runs`` (request indices; context ``lengths``, longest first) packed into
    batches of at most ``rows`` requests and ``tokens`` padded context tokens (runs x the
    first, longest, context); a run that exceeds either alone gets a batch of its own."""
    batches: list[list[list[int]]] = []
    used = longest = 0
    for run, n in zip(runs, lengths, strict=True):
        fits = bool(batches) and used + len(run) <= rows
        if fits and (len(batches[-1]) + 1) * longest <= tokens:
            batches[-1].append(run)
            used += len(run)
        else:
            batches.append([run])
            used, longest = len(run), n
    return batches


def run_contexts(forward: Forward, ctxs: Sequence[Sequence[int]]) -> list[CachedContext]:
    """One right-padded pass of ``ctxs``; each context's next-token log-probs and KV cache."""
    ids, mask, _ = pad_batch(ctxs, 0, "right")
    logits, past = forward(ids, mask, positions_from_mask(mask), None)
    out = []
    for j, ctx in enumerate(ctxs):
        n = len(ctx)
        first = torch.log_softmax(logits[j, n - 1].float(), -1)
        out.append(CachedContext(first, [(k[j, :, :n], v[j, :, :n]) for k, v in past]))
    return out


def stack_past(contexts: Sequence[CachedContext]) -> tuple[Past, torch.Tensor]:
    """The contexts' KV caches as one batch, left-padded with zeros to the longest, and the
    matching attention mask (1 on each context's own slots). Left, so that every context ends
    where the continuations begin: sliding-window masks count distance in cache slots."""
    lengths = torch.tensor([c.length for c in contexts])
    width = int(lengths.max())
    stacked: Past = []
    for layer in range(len(contexts[0].past)):
        pair = []
        for part in (0, 1):
            ref = contexts[0].past[layer][part]
            out = ref.new_zeros(len(contexts), ref.shape[0], width, ref.shape[2])
            for b, c in enumerate(contexts):
                out[b, :, width - c.length :] = c.past[layer][part]
            pair.append(out)
        stacked.append((pair[0], pair[1]))
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()
    return stacked, mask


def score_continuations(
    forward: Forward, contexts: Sequence[CachedContext], conts: Sequence[Sequence[int]]
) -> list[Scored]:
    """Continuations (each of 2+ tokens, one per entry of ``contexts``): one batched pass of
    their ``cont[:-1]`` on their contexts' stacked KV caches; first tokens by ``first``."""
    past, ctx_mask = stack_past(contexts)
    ids, mask, _ = pad_batch([list(c[:-1]) for c in conts], 0, "right")
    lengths = ctx_mask.sum(-1, keepdim=True)
    positions = lengths + torch.arange(ids.shape[1])[None]
    logits, _ = forward(ids, torch.cat([ctx_mask, mask], 1), positions, past)
    out = []
    for b, (ctx, cont) in enumerate(zip(contexts, conts, strict=True)):
        logprobs = torch.log_softmax(logits[b, : len(cont) - 1].float(), -1)
        target = torch.tensor(list(cont[1:]), device=logprobs.device)
        first, greedy = ctx.score_first(cont[0])
        total = first + float(logprobs.gather(-1, target[:, None]).sum())
        out.append((total, greedy and bool((logprobs.argmax(-1) == target).all())))
    return out


def cache_contexts(forward: Forward, ctxs: Sequence[Sequence[int]]) -> list[CachedContext]:
    """``ctxs`` (longest first) in passes of at most :data:`SHARED_CONTEXT_TOKENS` padded
    tokens (a longer context alone)."""
    singles = [[k] for k in range(len(ctxs))]
    out: list[CachedContext] = []
    for batch in pack_runs(singles, [len(c) for c in ctxs], len(ctxs), SHARED_CONTEXT_TOKENS):
        out += run_contexts(forward, [ctxs[k] for [k] in batch])
    return out


def score_window(forward: Forward, items: Sequence[Item], batch_size: int) -> list[Scored]:
    """``items`` of ``(context, continuations)``, longest context first: batched context
    passes, then the continuations of 2+ tokens longest first, ``batch_size`` per pass. The
    scores come flat, in item order."""
    contexts = cache_contexts(forward, [ctx for ctx, _ in items])
    owner = [contexts[k] for k, (_, conts) in enumerate(items) for _ in conts]
    conts = [c for _, cs in items for c in cs]
    out = [c.score_first(x[0]) for c, x in zip(owner, conts, strict=True)]
    longer = sorted((i for i, c in enumerate(conts) if len(c) > 1), key=lambda i: -len(conts[i]))
    for start in range(0, len(longer), batch_size):
        part = longer[start : start + batch_size]
        scored = score_continuations(forward, [owner[i] for i in part], [conts[i] for i in part])
        for i, result in zip(part, scored, strict=True):
            out[i] = result
    return out
