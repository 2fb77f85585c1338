"""Where evaluation and calibration data live: one rule for every stage.

A path that exists as given is used as given. Any other relative name (``wikitext-2/test.txt``,
``piqa/valid.jsonl``) resolves in the data directory: the one passed explicitly
(``--data-dir``), else ``LP_DEPLOY_DATA_DIR``, else ``../shared/data`` beside the working
directory or beside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

from lp_deploy.errors import DataError

DATA_DIR_ENV = "LP_DEPLOY_DATA_DIR"


def default_data_dir() -> Path:
    """``LP_DEPLOY_DATA_DIR``, else the first ``../shared/data`` found beside the working
    directory or the project (that path, even when missing, if neither exists)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: ``explicit`` when given, else :func:`default_data_dir`."""
    return Path(explicit).expanduser() if explicit is not None else default_data_dir()


def data_file(name: str | Path, explicit_dir: str | Path | None = None) -> Path:
    """An existing file: ``name`` as given, else ``name`` inside the data directory."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    root = data_dir(explicit_dir)
    inside = root / path
    if not path.is_absolute() and inside.is_file():
        return inside
    missing = "" if root.is_dir() else f" (the data dir {root} does not exist)"
    raise DataError(
        f"data file {str(name)!r} not found: neither {path} nor {inside} exists{missing}; "
        f"pass an existing path, --data-dir DIR, or set {DATA_DIR_ENV} to the directory "
        "holding wikitext-2/, piqa/, arc/, hellaswag/, boolq/, winogrande/, copa/ and wsc273/"
    )
