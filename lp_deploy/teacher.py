"""The teacher cache: the dense model's top-k next-token probabilities over the distillation
windows, computed once and stored on disk (fp16 probabilities, int32 ids, safetensors shards,
a JSON manifest naming the model, the data, k, seqlen and the window count).

A cache is reused when its manifest matches the run exactly and refused with a clear error
when it does not; it is built in a temporary sibling directory and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lp_deploy.calibration import CalibrationSpec, load_text, sample_windows, tokenize_text
from lp_deploy.data import data_file
from lp_deploy.errors import DataError, LpDeployError
from lp_deploy.model import LoadedModel
from lp_deploy.shards import CacheError, ShardReader, read_manifest, write_manifest, write_shards
from lp_deploy.sources import cache_dir, sha256_file

log = logging.getLogger(__name__)
FORMAT = "lp-deploy-teacher-cache/1"
WINDOWS_PER_SHARD = 16
#: manifest fields that must match for a cache to be reused
KEY_FIELDS = ("format", "model", "data", "k", "seqlen", "count")


def data_record(spec: CalibrationSpec) -> dict[str, Any]:
    """What identifies the windows: the file's sha256 (not its path), the text field and the
    seed (``hf:`` datasets by name)."""
    source = spec.data if spec.data.startswith("hf:") else sha256_file(data_file(spec.data))
    key = "dataset" if spec.data.startswith("hf:") else "sha256"
    return {key: source, "text_field": spec.text_field, "seed": spec.seed}


def model_record(source: dict[str, Any]) -> dict[str, Any]:
    """The dense model's content hashes; only its name when it has none (a hub id)."""
    sha = source.get("sha256")
    if sha:
        return {"sha256": dict(sorted(sha.items()))}
    return {"source": source.get("source"), "unverified": True}


def verifiable(key: dict[str, Any]) -> bool:
    """Whether the key identifies the model and the data by content (not only by name)."""
    return "sha256" in key["model"] and "sha256" in key["data"]


def cache_key(source: dict[str, Any], spec: CalibrationSpec, k: int) -> dict[str, Any]:
    """What a teacher cache must have been built from to be reused (``source``: the
    checkpoint's record of its dense model)."""
    return {
        "format": FORMAT,
        "model": model_record(source),
        "data": data_record(spec),
        "k": k,
        "seqlen": spec.seqlen,
        "count": spec.samples,
    }


def default_cache_dir(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(create=False) / "teacher" / digest


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{name}: cache has {found.get(name)!r}, this run needs {wanted[name]!r}"
        for name in KEY_FIELDS
        if found.get(name) != wanted[name]
    ]


def check_cache(directory: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a matching cache, None when ``directory`` does not exist; a
    :class:`CacheError` naming every difference when it was built from other inputs."""
    manifest = read_manifest(directory, "teacher cache")
    if manifest is None:
        return None
    if not verifiable(key):
        raise CacheError(
            f"teacher cache {directory} exists, but the dense model or the data is known only by "
            f"name ({key['model']}, {key['data']}), not by content, so the cache cannot be "
            "checked against it; delete the directory to rebuild it"
        )
    diffs = _differences(manifest, key)
    if diffs:
        raise CacheError(
            f"teacher cache {directory} was built from other inputs ({'; '.join(diffs)}); "
            "point --teacher-cache at another directory or delete this one"
        )
    return manifest


def distill_windows(tokenizer: Any, spec: CalibrationSpec) -> torch.Tensor:
    """The seeded windows of ``spec`` (clear errors for empty or too-short data)."""
    ids = tokenize_text(tokenizer, load_text(spec.data, spec.text_field))
    if ids.numel() == 0:
        raise DataError(f"data file {spec.data!r} is empty (no tokens); give a text file")
    if ids.numel() < spec.seqlen + 1:
        raise DataError(
            f"data file {spec.data!r} has {ids.numel()} tokens, fewer than one window of "
            f"--seqlen {spec.seqlen} (+1); give more text or a shorter --seqlen"
        )
    return sample_windows(ids, spec.samples, spec.seqlen, spec.seed)


@torch.no_grad()
def teacher_topk(model: Any, ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k ids of the dense model's logits per token and the softmax over those k."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0].float()
    top, idx = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(top, dim=-1)
    return {"probs": probs.to(torch.float16), "ids": idx.to(torch.int32)}


def build_cache(
    dense: LoadedModel,
    windows: torch.Tensor,
    key: dict[str, Any],
    directory: Path,
    data_path: str,
    progress: bool = True,
    after_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the dense model over ``windows`` once and write the cache (atomically);
    ``after_window`` runs after each window's forward pass (e.g. to keep a hooked state)."""
    vocab = int(dense.model.config.get_text_config().vocab_size)
    if key["k"] > vocab:
        raise LpDeployError(f"--topk {key['k']} is above the vocabulary size {vocab}")
    with write_shards(directory, WINDOWS_PER_SHARD) as writer:
        for row in tqdm(windows, desc="teacher cache", disable=not progress):
            writer.add(
                {"input_ids": row.to(torch.int32), **teacher_topk(dense.model, row, key["k"])}
            )
            if after_window is not None:
                after_window()
        writer.flush()
        manifest = {**key, "vocab_size": vocab, "tokens": int(windows.numel())}
        manifest["data_path"] = str(data_path)
        manifest["shards"] = writer.shards
        write_manifest(writer.directory, manifest)
    return manifest


@dataclass
class TeacherCache:
    """A complete teacher cache on disk."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def reader(self) -> ShardReader:
        return ShardReader(self.directory, self.manifest["shards"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def window(self, i: int) -> dict[str, torch.Tensor]:
        """``input_ids`` (seqlen,) int64, ``probs`` (seqlen, k) float32, ``ids`` (seqlen, k)."""
        t = self.reader.get(i, ("input_ids", "probs", "ids"))
        return {
            "input_ids": t["input_ids"].long(),
            "probs": t["probs"].float(),
            "ids": t["ids"].long(),
        }

    def size_bytes(self) -> int:
        return self.reader.size_bytes()


def open_cache(directory: Path, key: dict[str, Any]) -> TeacherCache:
    manifest = check_cache(directory, key)
    if manifest is None:
        raise CacheError(f"teacher cache {directory} does not exist")
    return TeacherCache(directory, manifest)


__all__ = [
    "CacheError",
    "TeacherCache",
    "build_cache",
    "cache_key",
    "check_cache",
    "default_cache_dir",
    "distill_windows",
    "open_cache",
]
