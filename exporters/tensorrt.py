"""TensorRT engine from an ONNX export (TensorRT's documented Python API).

The ONNX graph's named dynamic dims become one optimisation profile:
``batch_size`` in [1, max_batch], ``sequence_length`` in [1, max_seq],
``past_sequence_length`` in [0, max_past] (0: prefill) and ``total_sequence_length`` in
[1, max_seq + max_past]. TensorRT needs an NVIDIA GPU and NVIDIA's package index; where
``import tensorrt`` fails the build stops with a clear error before writing anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lp_deploy.artifacts import ONNX_FILE, Kind, read_manifest, write_manifest
from lp_deploy.errors import LpDeployError, OutputExistsError

ENGINE_FILE = "model.plan"
Shape = tuple[int, ...]


@dataclass
class TensorRTConfig:
    """Options of ``lp-deploy export tensorrt``; ``opt_*`` are the shapes TensorRT tunes for
    (default: batch-1 decode with a 256-token past)."""

    onnx_dir: Path
    out: Path | None = None  # default: onnx_dir / model.plan
    overwrite: bool = False
    fp16: bool = False
    max_batch: int = 4
    max_seq: int = 512
    max_past: int = 1024
    opt_batch: int = 1
    opt_seq: int = 1
    opt_past: int = 256
    workspace_bytes: int = 4 << 30


def dim_ranges(cfg: TensorRTConfig) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named dynamic dim."""
    if not 1 <= cfg.opt_batch <= cfg.max_batch or not 1 <= cfg.opt_seq <= cfg.max_seq:
        raise LpDeployError("need 1 <= opt_batch <= max_batch and 1 <= opt_seq <= max_seq")
    if not 0 <= cfg.opt_past <= cfg.max_past:
        raise LpDeployError("need 0 <= opt_past <= max_past")
    return {
        "batch_size": (1, cfg.opt_batch, cfg.max_batch),
        "sequence_length": (1, cfg.opt_seq, cfg.max_seq),
        "past_sequence_length": (0, cfg.opt_past, cfg.max_past),
        "total_sequence_length": (1, cfg.opt_seq + cfg.opt_past, cfg.max_seq + cfg.max_past),
    }


def graph_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: an int (static) or the dim's name (dynamic)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs: dict[str, list[int | str]] = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return inputs


def profile_shapes(onnx_path: Path, cfg: TensorRTConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every graph input, computed from its named dims."""
    ranges = dim_ranges(cfg)
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, dims in graph_inputs(onnx_path).items():
        unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise LpDeployError(
                f"input {name} has dynamic dims {unknown} that are not among {list(ranges)}; "
                "re-export with 'lp-deploy export onnx'"
            )
        per_dim = [ranges[d] if isinstance(d, str) else (d, d, d) for d in dims]
        lo, opt, hi = (tuple(r[k] for r in per_dim) for k in range(3))
        shapes[name] = (lo, opt, hi)
    return shapes


def import_tensorrt() -> Any:
    """``tensorrt``, or the error that says how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise LpDeployError(
            "TensorRT is not installed: pip install tensorrt (TensorRT >= 10, from NVIDIA's "
            "package index) on a machine with an NVIDIA GPU and CUDA; the ONNX export runs "
            "anywhere with 'lp-deploy generate DIR --runtime onnxruntime'"
        ) from exc
    return tensorrt


def _network_flags(trt: Any) -> int:
    """EXPLICIT_BATCH before TensorRT 10 (where it is the only mode and the flag is gone)."""
    major = int(str(trt.__version__).split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return 1 << int(flag) if major < 10 and flag is not None else 0


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """The network (and its parser, which must outlive it) parsed from ``onnx_path``; the
    parser reads ``model.onnx.data`` beside it."""
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LpDeployError(f"TensorRT cannot parse {onnx_path}: {errors}")
    return network, parser


def build_engine(cfg: TensorRTConfig) -> Path:
    """Parse the ONNX export, build a serialized engine with one optimisation profile, write it
    atomically; returns its path."""
    onnx_path = Path(cfg.onnx_dir) / ONNX_FILE
    if not onnx_path.is_file():
        raise LpDeployError(f"{cfg.onnx_dir} has no {ONNX_FILE}; run 'lp-deploy export onnx' first")
    out = Path(cfg.out) if cfg.out else Path(cfg.onnx_dir) / ENGINE_FILE
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"--out {out} exists; choose another path or pass --overwrite")
    shapes = profile_shapes(onnx_path, cfg)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LpDeployError("TensorRT failed to build the engine (see its log above)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _record_engine(out)
    return out


def _record_engine(engine: Path) -> None:
    """List an engine written inside an ONNX export in that export's manifest."""
    manifest = read_manifest(engine.parent)
    if manifest is not None and manifest.get("kind") == Kind.ONNX.value:
        write_manifest(engine.parent, Kind.ONNX, [*manifest.get("files", []), engine.name])
