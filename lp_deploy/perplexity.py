"""Perplexity on non-overlapping token windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.calibration import contiguous_windows, load_text, tokenize_text

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods of ``ids`` (batch, seq) and the token count."""
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1).to(pred.device)
    return float(F.cross_entropy(pred, target, reduction="sum")), int(target.numel())


@torch.no_grad()
def perplexity_of(
    logits_fn: LogitsFn,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """``exp(mean NLL)`` over ``windows`` (n, seqlen); tokens 2..seqlen of each are predicted."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size]
        nll, n = window_nll(logits_fn(batch), batch)
        total, count = total + nll, count + n
    return math.exp(total / count)


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Logits of a Hugging Face causal LM for full windows (no cache)."""
    device = next(model.parameters()).device

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return fn


def eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str | Path,
    seqlen: int = 512,
    limit: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of a text file (e.g. wikitext-2 ``test.txt``)."""
    return contiguous_windows(tokenize_text(tokenizer, load_text(text)), seqlen, limit)


@dataclass(frozen=True)
class PerplexitySpec:
    """Which text and windows perplexity is measured on (shared by every stage)."""

    data: str = "wikitext-2/test.txt"
    seqlen: int = 512
    limit: int | None = None  # the first N windows; None: all

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        return eval_windows(tokenizer, self.data, self.seqlen, self.limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of a PyTorch causal LM over ``windows``."""
    return perplexity_of(torch_logits_fn(model), windows, batch_size, progress, desc)
