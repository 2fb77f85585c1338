"""What lp-deploy reads and writes: artifact kinds, one reader, and one ``--out`` rule.

Every directory lp-deploy writes carries a manifest (:data:`MANIFEST_FILE`: its kind and the
files lp-deploy put there). :func:`inspect_artifact` tells any source apart (alias, GGUF file,
hub id, dense model directory, patched checkpoint, ONNX export, bench report, ...), from the
manifest or, for directories written before manifests existed, from their content.

The ``--out`` rule, the same for every stage (:func:`check_out`, :func:`output_dir`):
``--out`` may be a new directory or a previous artifact of the same kind, which is replaced
atomically. Anything else (a directory holding files lp-deploy did not write, an artifact of
another kind) is refused unless ``overwrite``; even then, no file lp-deploy did not write is
ever deleted or replaced: the new files are moved in beside it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from lp_deploy import __version__
from lp_deploy.aliases import ALIASES
from lp_deploy.atomic import atomic_dir
from lp_deploy.errors import CheckpointError, ModelSourceError, OutputExistsError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded weights
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
EXPORT_REPORT_FILE = "export.json"
MANIFEST_FILE = "lp_deploy_artifact.json"
#: the section of ``config.json`` where lp-deploy records what it did to a model
META_KEY = "lp_deploy"


class Kind(str, Enum):
    """Kinds of model sources and of artifacts lp-deploy writes."""

    ALIAS = "alias"  # a built-in model name (e.g. smollm2-135m)
    GGUF = "gguf"  # a .gguf file
    HUB = "hub"  # a Hugging Face hub id (org/name)
    MODEL = "model"  # a dense Hugging Face model directory
    CHECKPOINT = "checkpoint"  # a pruned (patched, maybe folded) checkpoint
    ONNX = "onnx"  # an 'lp-deploy export onnx' directory
    REPORT = "report"  # an 'lp-deploy bench' report directory
    SWEEP = "sweep"  # an 'lp-deploy sweep' result directory
    TRITON_REPO = "triton_repo"  # an 'lp-deploy triton build' Triton model repository


#: files lp-deploy writes, per kind; used for directories written before manifests existed
_HF_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "model*.safetensors",
    WEIGHTS_INDEX_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
)
_KNOWN_FILES: dict[Kind, tuple[str, ...]] = {
    Kind.MODEL: _HF_FILES,
    Kind.CHECKPOINT: (*_HF_FILES, "summary.json", "fold_report.json", "distill.json"),
    Kind.ONNX: (*_HF_FILES, ONNX_FILE, ONNX_DATA_FILE, EXPORT_REPORT_FILE),
    Kind.REPORT: ("report.json", "report.md", "*.png", "artifacts/*"),
    Kind.SWEEP: ("sweep.json", "sweep.png", "front.png"),
}


@dataclass(frozen=True)
class Artifact:
    """A classified source: its kind, where it is, and its ``lp_deploy`` metadata."""

    kind: Kind
    location: Path | str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The local path (not for hub ids or aliases)."""
        if not isinstance(self.location, Path):
            raise ModelSourceError(f"{self.location!r} is a {self.kind.value}, not a local path")
        return self.location


# --------------------------------------------------------------------------- reading


def clean_json(value: Any) -> Any:
    """NaN/inf -> None, paths -> str, tuples -> lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` when it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the {what} is corrupt") from exc
    return data if isinstance(data, dict) else {}


def config_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``lp_deploy`` section of ``path/config.json`` (None when absent; unvalidated)."""
    cfg_file = Path(path).expanduser() / CONFIG_FILE
    if not cfg_file.is_file():
        return None
    meta = read_json(cfg_file, "checkpoint").get(META_KEY)
    return meta if isinstance(meta, dict) else None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a directory lp-deploy wrote (None when there is none)."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        return None
    data = read_json(file, "artifact manifest")
    return data if "kind" in data else None


def _content_kind(path: Path) -> Kind | None:
    """A directory's kind from its files (for directories without a manifest)."""
    if (path / ONNX_FILE).is_file():
        return Kind.ONNX
    if (path / CONFIG_FILE).is_file():
        meta = config_meta(path)
        return Kind.CHECKPOINT if meta is not None and "plan" in meta else Kind.MODEL
    if (path / "report.json").is_file():
        return Kind.REPORT
    if (path / "sweep.json").is_file():
        return Kind.SWEEP
    return None


def dir_kind(path: Path) -> Kind | None:
    """The kind of an existing directory (manifest first, else content); None: not one."""
    manifest = read_manifest(path)
    if manifest is not None:
        with contextlib.suppress(ValueError):
            return Kind(manifest["kind"])
    return _content_kind(path)


def _source_error(path: Path, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path} {why}; point at a Hugging Face model directory (config.json + *.safetensors), "
        "an lp-deploy checkpoint or ONNX export, a .gguf file, a hub id (org/name), or one of "
        f"the aliases: {', '.join(ALIASES)}"
    )


def inspect_artifact(source: str | Path) -> Artifact:
    """Classify a model source or artifact; a clear error when it is none of them."""
    name = str(source)
    if name in ALIASES and not Path(name).exists():
        return Artifact(Kind.ALIAS, name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return Artifact(Kind.GGUF, path)
        raise _source_error(path, "is a file but not a .gguf model")
    if path.is_dir():
        kind = dir_kind(path)
        if kind is None:
            raise _source_error(path, "is a directory without config.json")
        meta = config_meta(path) if (path / CONFIG_FILE).is_file() else None
        return Artifact(kind, path, meta or {})
    looks_local = name.startswith((".", "/", "~")) or path.suffix in {".gguf", ".safetensors"}
    if looks_local or name.count("/") != 1:
        raise ModelSourceError(
            f"model {name!r} not found: no such file or directory, and it is not a hub id "
            f"(org/name) or an alias ({', '.join(ALIASES)})"
        )
    return Artifact(Kind.HUB, name)


# --------------------------------------------------------------------------- the --out rule


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _written_by_us(path: Path, kind: Kind, files: list[str]) -> set[str]:
    """The files of ``path`` that an earlier ``kind`` artifact wrote (none: another kind)."""
    manifest = read_manifest(path)
    if manifest is not None:
        if manifest.get("kind") != kind.value:
            return set()
        return {*manifest.get("files", []), MANIFEST_FILE}
    if _content_kind(path) != kind:
        return set()
    patterns = _KNOWN_FILES.get(kind, ())
    known = {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}
    # Without a manifest, only a directory holding nothing but lp-deploy's files counts as
    # one lp-deploy wrote; in a mixed one, none of the files can be told to be ours.
    return known if len(known) == len(files) else set()


def foreign_files(path: Path, kind: Kind) -> list[str]:
    """Files in ``path`` that no earlier ``kind`` artifact of lp-deploy wrote there."""
    if not path.is_dir():
        return []
    files = _files(path)
    ours = _written_by_us(path, kind, files)
    return [f for f in files if f not in ours]


def check_out(out: str | Path, kind: Kind, overwrite: bool = False) -> Path:
    """Raise :class:`OutputExistsError` unless ``out`` may receive a ``kind`` artifact.

    Call it before any expensive work; :func:`output_dir` checks again when publishing.
    """
    out = Path(out).expanduser()
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"--out {out} exists and is not a directory; give a directory")
    foreign = foreign_files(out, kind)
    if foreign and not overwrite:
        found = dir_kind(out)
        what = f"an lp-deploy {found.value}" if found else "a directory"
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"--out {out} is {what} holding files lp-deploy did not write as a {kind.value} "
            f"({shown}); choose a new directory, or pass --overwrite to write beside them "
            "(they are kept)"
        )
    return out


def write_manifest(directory: Path, kind: Kind, files: list[str] | None = None) -> None:
    """Record ``kind`` and the files lp-deploy wrote (default: every file in ``directory``)."""
    listed = sorted(set(files if files is not None else _files(directory)) - {MANIFEST_FILE})
    data = {"kind": kind.value, "files": listed, "toolkit_version": __version__}
    (directory / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")


def _merge_into(tmp: Path, out: Path, kind: Kind) -> None:
    """Move the new files into ``out`` one by one, keeping files lp-deploy did not write
    there; earlier lp-deploy files that the new artifact lacks are removed."""
    new = _files(tmp)
    foreign = set(foreign_files(out, kind))
    clash = sorted(foreign & set(new))
    if clash:
        raise OutputExistsError(
            f"--out {out} holds {', '.join(clash)}, which lp-deploy did not write and would "
            "have to replace; move them away or choose another directory"
        )
    stale = [f for f in _files(out) if f not in foreign and f not in new]
    for name in new:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)
    for name in stale:
        (out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def output_dir(out: str | Path, kind: Kind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; when the block succeeds, its files (and a
    manifest) become ``out`` under the ``--out`` rule. On failure nothing changes."""
    out = check_out(out, kind, overwrite)
    if not foreign_files(out, kind):
        with atomic_dir(out) as tmp:
            yield tmp
            write_manifest(tmp, kind)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        write_manifest(tmp, kind)
        _merge_into(tmp, out, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
