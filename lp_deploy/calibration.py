"""Calibration and evaluation text: load it, tokenise it, cut seeded token windows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.errors import LpDeployError

HF_PREFIX = "hf:"
DATA_DIR_ENV = "LP_DEPLOY_DATA_DIR"


def default_data_dir() -> Path:
    """Evaluation data (``LP_DEPLOY_DATA_DIR``, else ``../shared/data`` beside the project)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def resolve_text_path(spec: str | Path) -> Path:
    """A text file path; bare names such as ``wikitext-2/valid.txt`` resolve in the data dir."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    in_data = default_data_dir() / path
    if not path.is_absolute() and in_data.is_file():
        return in_data
    raise FileNotFoundError(
        f"text file {str(spec)!r} not found (also looked in {in_data}); pass an existing "
        ".txt or .jsonl path, 'hf:DATASET[:CONFIG]:SPLIT', or set LP_DEPLOY_DATA_DIR"
    )


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
    path = resolve_text_path(spec)
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


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str | Path,
    n_samples: int,
    seqlen: int,
    seed: int,
    text_field: str = "text",
) -> torch.Tensor:
    """Seeded calibration windows from a text source."""
    return sample_windows(
        tokenize_text(tokenizer, load_text(spec, text_field)), n_samples, seqlen, seed
    )
