"""Stage ``triton build``: a Triton Inference Server model repository from an ONNX export.

The repository (artifact kind ``triton_repo``) holds, for a model called ``NAME``:

- ``NAME/``: a decoupled python-backend model that generates text (inputs ``text_input``,
  ``max_tokens``, ``stream``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``;
  outputs ``text_output``, ``token_ids``). Its ``model.py`` imports
  :mod:`lp_deploy.serving.python_model`, which runs the export (``NAME/1/export``) with
  lp-deploy's ONNX Runtime runtime, tokenizer, sampling and in-flight batching engine; the
  python backend's environment therefore needs lp-deploy installed (with numpy<2, see
  ``make triton``).
- ``NAME_onnx/``: an ``onnxruntime_onnx`` model of the raw graph (KV cache included).
- ``NAME_trt/``: a ``tensorrt_plan`` model when a TensorRT engine is given.
- ``README.md``: how to serve and call it.

Every ``config.pbtxt`` is built as Triton's ``ModelConfig`` protobuf, parsed back against the
schema and checked against the graph before anything is published (atomically, under the
``--out`` rule). Other lp-deploy models already in the repository are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lp_deploy import __version__
from lp_deploy.artifacts import ONNX_DATA_FILE, ONNX_FILE, Kind, check_out, output_dir
from lp_deploy.artifacts import read_manifest as _read_manifest
from lp_deploy.errors import LpDeployError

from .model_config import (
    GraphIO,
    check_generate_config,
    check_graph_config,
    check_kv_graph,
    generate_config,
    graph_config,
    read_graph_io,
)
from .repo_readme import repo_readme

CONFIG_PBTXT = "config.pbtxt"
VERSION = "1"
EXPORT_SUBDIR = "export"
DEVICES = ("cpu", "gpu")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

MODEL_PY = '''"""Triton python-backend model written by `lp-deploy triton build`
(lp-deploy {version}).

Generates text with the ONNX export in ./export: lp-deploy's ONNX Runtime runtime, tokenizer,
sampling and in-flight batching engine (lp_deploy.serving.python_model). The python backend's
environment needs lp-deploy installed, with numpy<2 (see the repository's README.md).
"""

from lp_deploy.serving.python_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
'''


@dataclass
class TritonRepoConfig:
    """Options of ``lp-deploy triton build``.

    ``max_batch``: sequences the generate model decodes together (in flight) per instance,
    and ``max_batch_size`` of the raw-graph models. ``threads``: ONNX Runtime intra-op
    threads per instance (0: ONNX Runtime's default). ``engine``: a TensorRT engine built
    from this export (``lp-deploy export tensorrt``) for the ``tensorrt_plan`` model.
    """

    export_dir: Path
    repo: Path
    name: str | None = None
    instances: int = 1
    device: str = "cpu"
    max_batch: int = 8
    threads: int = 0
    max_tokens: int = 32  # default when a request does not say
    engine: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.export_dir = Path(self.export_dir).expanduser()
        self.repo = Path(self.repo).expanduser()
        if self.name is None:
            self.name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.export_dir.resolve().name)
        if not _NAME.match(self.name):
            raise LpDeployError(
                f"model name {self.name!r}: use letters, digits, '_', '-' and '.' only"
            )
        if self.device not in DEVICES:
            raise LpDeployError(f"device must be one of {', '.join(DEVICES)}, got {self.device}")
        for label, value in (("instances", self.instances), ("max_batch", self.max_batch)):
            if value < 1:
                raise LpDeployError(f"{label} must be >= 1, got {value}")
        if self.threads < 0 or self.max_tokens < 1:
            raise LpDeployError("threads must be >= 0 and max_tokens >= 1")


@dataclass
class TritonRepoResult:
    """What ``build_repo`` wrote: the repository and its model names."""

    repo: Path
    generate_model: str
    onnx_model: str
    tensorrt_model: str | None = None
    kept_models: list[str] = field(default_factory=list)  # earlier lp-deploy models kept

    @property
    def models(self) -> list[str]:
        return [m for m in (self.generate_model, self.onnx_model, self.tensorrt_model) if m]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system: no copy of a 500 MB graph), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_export(export_dir: Path, dst: Path) -> None:
    for src in sorted(export_dir.iterdir()):
        if src.is_file():
            _link_or_copy(src, dst / src.name)


def _keep_earlier_models(repo: Path, tmp: Path, names: set[str]) -> list[str]:
    """Link the other models of an earlier lp-deploy repository into the new one."""
    manifest = _read_manifest(repo) if repo.is_dir() else None
    if not manifest or manifest.get("kind") != Kind.TRITON_REPO.value:
        return []
    kept: set[str] = set()
    for rel in manifest.get("files", []):
        top = rel.split("/", 1)[0]
        if "/" in rel and top not in names and (repo / rel).is_file():
            _link_or_copy(repo / rel, tmp / rel)
            kept.add(top)
    return sorted(kept)


def build_repo(cfg: TritonRepoConfig) -> TritonRepoResult:
    """Write (or update) the model repository ``cfg.repo`` for the export ``cfg.export_dir``."""
    export = cfg.export_dir
    io = read_graph_io(export / ONNX_FILE)
    check_kv_graph(io, export)
    check_out(cfg.repo, Kind.TRITON_REPO, cfg.overwrite)
    if cfg.engine is not None and not Path(cfg.engine).is_file():
        raise LpDeployError(f"TensorRT engine {cfg.engine} does not exist")
    name = str(cfg.name)
    result = TritonRepoResult(cfg.repo, name, f"{name}_onnx", f"{name}_trt" if cfg.engine else None)
    configs = _configs(cfg, io, result)  # all validated before anything is written
    with output_dir(cfg.repo, Kind.TRITON_REPO, cfg.overwrite) as tmp:
        result.kept_models = _keep_earlier_models(cfg.repo, tmp, set(result.models))
        for model, text in configs.items():
            (tmp / model / VERSION).mkdir(parents=True)
            (tmp / model / CONFIG_PBTXT).write_text(text)
        _copy_export(export, tmp / name / VERSION / EXPORT_SUBDIR)
        (tmp / name / VERSION / "model.py").write_text(MODEL_PY.format(version=__version__))
        _link_or_copy(export / ONNX_FILE, tmp / result.onnx_model / VERSION / ONNX_FILE)
        if (export / ONNX_DATA_FILE).is_file():
            _link_or_copy(
                export / ONNX_DATA_FILE, tmp / result.onnx_model / VERSION / ONNX_DATA_FILE
            )
        if cfg.engine is not None and result.tensorrt_model:
            _link_or_copy(Path(cfg.engine), tmp / result.tensorrt_model / VERSION / "model.plan")
        (tmp / "README.md").write_text(repo_readme(cfg, result))
    return result


def _configs(cfg: TritonRepoConfig, io: GraphIO, result: TritonRepoResult) -> dict[str, str]:
    """Every model's ``config.pbtxt``, parsed against the schema and checked."""
    params = {
        "export_dir": EXPORT_SUBDIR,
        "device": cfg.device,
        "max_batch": str(cfg.max_batch),
        "threads": str(cfg.threads),
        "max_tokens": str(cfg.max_tokens),
    }
    gen = generate_config(result.generate_model, cfg.instances, cfg.device, params)
    check_generate_config(gen, f"{result.generate_model}/{CONFIG_PBTXT}")
    out = {result.generate_model: gen}
    platforms = [(result.onnx_model, "onnxruntime_onnx")]
    if result.tensorrt_model:
        platforms.append((result.tensorrt_model, "tensorrt_plan"))
    for model, platform in platforms:
        text = graph_config(model, platform, io, cfg.max_batch, cfg.instances, cfg.device)
        check_graph_config(text, io, f"{model}/{CONFIG_PBTXT}")
        out[model] = text
    return out
