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


def sample_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens (seeded), shape (n_samples, seqlen)."""
    if n_samples < 1 or seqlen < 2:
        raise LpDeployError(f"need samples >= 1 and seqlen >= 2, got {n_samples} x {seqlen}")
    if ids.numel() < seqlen + 1:
        raise LpDeployError(f"text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


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
        ids = tokenize_text(tokenizer, load_text(self.data, self.text_field))
        return sample_windows(ids, self.samples, self.seqlen, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationSpec:
        """From :meth:`to_dict` output (extra keys, e.g. ``tokens``, are ignored)."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**fields, "data": str(fields.get("data", cls.data))})
