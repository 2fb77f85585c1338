"""Calibration and evaluation text: load it, tokenise it, cut seeded token windows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.data import data_file
from lp_deploy.errors import LpDeployError

HF_PREFIX = "hf:"
#: held-back calibration windows ``--select ppl`` scores on (default of ``--holdout``)
HOLDOUT_WINDOWS = 4


def _read_jsonl(path: Path, field: str) -> str:
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise LpDeployError(f"{path}:{lineno} has no field {field!r}; use --text-field")
            texts.append(str(record[field]))
    return "\n\n".join(texts)


def _read_hf_dataset(spec: str, field: str) -> str:
    parts = spec[len(HF_PREFIX) :].split(":")
    if len(parts) not in (2, 3):
        raise LpDeployError(f"bad dataset spec {spec!r}; expected hf:NAME[:CONFIG]:SPLIT")
    try:
        import datasets
    except ImportError as exc:
        raise LpDeployError(
            "hf: datasets need the 'datasets' package: pip install datasets"
        ) from exc
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    rows = datasets.load_dataset(name, config, split=split)
    return "\n\n".join(str(t) for t in rows[field])


def load_text(spec: str | Path, text_field: str = "text") -> str:
    """Text of a plain file (wikitext format), a jsonl file's ``text_field``, or an hf dataset."""
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        return _read_hf_dataset(spec, text_field)
    path = data_file(spec)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return path.read_text(encoding="utf-8")


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_starts(n_tokens: int, n_samples: int, seqlen: int, seed: int) -> list[int]:
    """Start offsets of ``n_samples`` random windows of ``seqlen`` tokens (seeded)."""
    if n_samples < 1 or seqlen < 2:
        raise LpDeployError(f"need samples >= 1 and seqlen >= 2, got {n_samples} x {seqlen}")
    if n_tokens < seqlen + 1:
        raise LpDeployError(f"text has {n_tokens} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (n_samples,), generator=gen).tolist()


def sample_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens (seeded), shape (n_samples, seqlen)."""
    starts = sample_starts(ids.numel(), n_samples, seqlen, seed)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def holdout_windows(
    ids: torch.Tensor, taken: list[int], count: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens sharing no token with the windows starting at
    ``taken`` (each ``seqlen`` long): a seeded choice among the free non-overlapping slots
    ``[k * seqlen, (k + 1) * seqlen)``. Shape (count, seqlen)."""
    if count < 1:
        raise LpDeployError(f"need at least 1 held-back window, got {count}")
    free = [
        k * seqlen
        for k in range(ids.numel() // seqlen)
        if not any(t < (k + 1) * seqlen and k * seqlen < t + seqlen for t in taken)
    ]
    if len(free) < count:
        raise LpDeployError(
            f"the calibration text has only {len(free)} windows of {seqlen} tokens that do not "
            f"overlap the {len(taken)} fitting windows; asked for {count} held-back windows "
            "(use fewer --holdout windows, fewer --samples, or a longer text)"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(free), generator=gen)[:count].tolist())
    return torch.stack([ids[free[i] : free[i] + seqlen] for i in chosen])


def contiguous_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering ``ids`` (the remainder is dropped), shape (n, seqlen)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise LpDeployError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows a stage uses; recorded whole in every checkpoint.

    ``data``: a ``.txt`` file (relative names resolve in the data dir), a ``.jsonl`` file
    (``text_field``), or ``hf:NAME[:CONFIG]:SPLIT``.
    """

    data: str = "wikitext-2/valid.txt"
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    text_field: str = "text"

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """``samples`` seeded windows of ``seqlen`` tokens, shape (samples, seqlen)."""
        return sample_windows(self._ids(tokenizer), self.samples, self.seqlen, self.seed)

    def holdout(self, tokenizer: PreTrainedTokenizerBase, count: int) -> torch.Tensor:
        """``count`` windows of the same text and length sharing no token with
        :meth:`windows` (what ``--select ppl`` scores on), shape (count, seqlen)."""
        ids = self._ids(tokenizer)
        taken = sample_starts(ids.numel(), self.samples, self.seqlen, self.seed)
        return holdout_windows(ids, taken, count, self.seqlen, self.seed)

    def _ids(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        return tokenize_text(tokenizer, load_text(self.data, self.text_field))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationSpec:
        """From :meth:`to_dict` output (extra keys, e.g. ``tokens``, are ignored)."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**fields, "data": str(fields.get("data", cls.data))})
