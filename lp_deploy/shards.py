"""Per-window tensors on disk: safetensors shards + a JSON manifest, written atomically and
read back one window at a time (memory does not grow with the number of windows)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lp_deploy.atomic import atomic_dir
from lp_deploy.errors import LpDeployError

MANIFEST = "manifest.json"


class CacheError(LpDeployError):
    """A cache directory is missing, corrupt, or was built for other inputs."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class ShardWriter:
    """Collects per-window tensors and writes a shard every ``per_shard`` windows."""

    directory: Path
    per_shard: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _count: int = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """One window's tensors (same names and shapes for every window)."""
        self._pending.append({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        if len(self._pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = shard_name(len(self.shards))
        keys = self._pending[0].keys()
        stacked = {k: torch.stack([w[k] for w in self._pending]) for k in keys}
        save_file(stacked, str(self.directory / name))
        self.shards.append({"file": name, "start": self._count, "count": len(self._pending)})
        self._count += len(self._pending)
        self._pending = []

    @property
    def count(self) -> int:
        return self._count + len(self._pending)


@contextmanager
def write_shards(out: Path, per_shard: int) -> Iterator[ShardWriter]:
    """A :class:`ShardWriter` into a temporary directory that becomes ``out`` when the block
    ends without error (the caller writes the manifest into ``writer.directory`` inside it)."""
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, per_shard)
        yield writer
        writer.flush()


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    path = directory / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: Path, what: str) -> dict[str, Any] | None:
    """The manifest of a cache directory; None when the directory does not exist."""
    if not directory.exists():
        return None
    path = directory / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{directory} exists but is not a {what} (no {MANIFEST}); delete it or choose "
            "another directory"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is corrupt ({exc}); delete {directory}") from exc
    if not isinstance(data, dict) or "shards" not in data:
        raise CacheError(f"{path} is not a {what} manifest; delete {directory}")
    return data


class ShardReader:
    """Reads window ``i`` of a shard directory (opens the shard per read: no mapping kept)."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]]) -> None:
        self.directory = directory
        self.index: list[tuple[str, int]] = []
        for shard in shards:
            self.index += [(shard["file"], j) for j in range(int(shard["count"]))]

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        file, j = self.index[i]
        path = self.directory / file
        try:
            with safe_open(str(path), "pt") as fh:
                return {n: fh.get_slice(n)[j : j + 1][0].clone() for n in names}
        except (SafetensorError, OSError) as exc:
            raise CacheError(
                f"{path} is missing or corrupt ({exc}); delete {self.directory}"
            ) from exc

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
