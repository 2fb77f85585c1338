"""Triton ``config.pbtxt`` files: built as Triton's own ``ModelConfig`` protobuf, parsed back
against that schema, and checked against the exported ONNX graph's inputs and outputs.

The schema ships in ``tritonclient`` (``tritonclient.grpc.model_config_pb2``), so no server
is needed to validate a configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lp_deploy.artifacts import ONNX_FILE
from lp_deploy.errors import LpDeployError

#: ONNX element type name -> Triton data type name
_ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}

#: the generate model's inputs, shaped like the vLLM / TensorRT-LLM backends' models:
#: (name, Triton type, dims, optional)
GENERATE_INPUTS: tuple[tuple[str, str, tuple[int, ...], bool], ...] = (
    ("text_input", "TYPE_STRING", (1,), False),
    ("max_tokens", "TYPE_INT32", (1,), True),
    ("stream", "TYPE_BOOL", (1,), True),
    ("temperature", "TYPE_FP32", (1,), True),
    ("top_k", "TYPE_INT32", (1,), True),
    ("top_p", "TYPE_FP32", (1,), True),
    ("seed", "TYPE_UINT64", (1,), True),
    ("stop", "TYPE_STRING", (-1,), True),
)
GENERATE_OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_output", "TYPE_STRING", (-1,)),
    ("token_ids", "TYPE_INT32", (-1,)),
)


def model_config_pb2() -> Any:
    """``tritonclient.grpc.model_config_pb2``, or a clear error naming the extra."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise LpDeployError(
            "tritonclient is not installed (it ships Triton's ModelConfig schema): "
            "pip install 'lp-deploy[triton]'"
        ) from exc
    return model_config_pb2


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, Triton data type, dims (-1: dynamic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of an exported ONNX graph."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batched(self) -> bool:
        """Whether every tensor's first dim is the dynamic ``batch_size``."""
        return all(t.dims and t.dims[0] == -1 for t in (*self.inputs, *self.outputs))


def read_graph_io(onnx_file: Path) -> GraphIO:
    """Names, Triton data types and dims (-1 for a named/dynamic dim) of ``onnx_file``."""
    import onnx

    if not onnx_file.is_file():
        raise LpDeployError(f"{onnx_file} does not exist; give an 'lp-deploy export onnx' dir")
    graph = onnx.load(str(onnx_file), load_external_data=False).graph

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if elem not in _ONNX_TO_TRITON:
            raise LpDeployError(f"{onnx_file}: {value.name} has type {elem}, unknown to Triton")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, _ONNX_TO_TRITON[elem], dims)

    return GraphIO(tuple(map(spec, graph.input)), tuple(map(spec, graph.output)))


def check_kv_graph(io: GraphIO, where: Path) -> int:
    """The number of layers of a KV-cache graph the generate model can drive; a clear error
    when an input or output it needs is missing."""
    names = {t.name for t in io.inputs}
    outs = {t.name for t in io.outputs}
    layers = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
    need_in = {"input_ids", "attention_mask"} | {
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    }
    need_out = {"logits"} | {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    missing = sorted((need_in - names) | (need_out - outs))
    if not layers or missing:
        raise LpDeployError(
            f"{where / ONNX_FILE} is not a KV-cache graph the generate model can run (missing "
            f"{', '.join(missing) or 'past_key_values.*'}); export it with 'lp-deploy export onnx'"
        )
    return layers


# --------------------------------------------------------------------------- building


def _add_tensors(target: Any, tensors: Sequence[TensorSpec], optional: Sequence[str] = ()) -> None:
    pb = model_config_pb2()
    for t in tensors:
        entry = target.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.dims)
        if t.name in optional:
            entry.optional = True


def _instances(pb: Any, count: int, device: str) -> Any:
    kind = pb.ModelInstanceGroup.KIND_GPU if device == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    return pb.ModelInstanceGroup(count=count, kind=kind)


def generate_config(name: str, instances: int, device: str, parameters: dict[str, str]) -> str:
    """The python-backend generate model's ``config.pbtxt`` (decoupled, not batched by
    Triton: the model batches requests itself, in flight)."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    _add_tensors(
        cfg.input,
        [TensorSpec(n, t, d) for n, t, d, _ in GENERATE_INPUTS],
        [n for n, _, _, opt in GENERATE_INPUTS if opt],
    )
    _add_tensors(cfg.output, [TensorSpec(*o) for o in GENERATE_OUTPUTS])
    cfg.instance_group.append(_instances(pb, instances, device))
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value
    return _to_text(cfg)


def graph_config(
    name: str, platform: str, io: GraphIO, max_batch: int, instances: int, device: str
) -> str:
    """An ``onnxruntime_onnx`` or ``tensorrt_plan`` model for the raw graph: every input and
    output (KV cache included) with its data type and dims (batch dim left to Triton when
    ``max_batch`` > 0 and every tensor is batched)."""
    pb = model_config_pb2()
    batch = max_batch if max_batch > 0 and io.batched else 0

    def dims(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.data_type, t.dims[1:] if batch else t.dims)

    cfg = pb.ModelConfig(name=name, platform=platform, max_batch_size=batch)
    _add_tensors(cfg.input, [dims(t) for t in io.inputs])
    _add_tensors(cfg.output, [dims(t) for t in io.outputs])
    cfg.instance_group.append(_instances(pb, instances, device))
    return _to_text(cfg)


def _to_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return str(text_format.MessageToString(cfg))


# --------------------------------------------------------------------------- validating


def parse_config(text: str, where: str = "config.pbtxt") -> Any:
    """``text`` parsed as Triton's ``ModelConfig``; a clear error when it does not fit."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_pb2().ModelConfig())
    except text_format.ParseError as exc:
        raise LpDeployError(f"{where} is not a valid Triton ModelConfig: {exc}") from exc


def _tensors(entries: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    pb = model_config_pb2()
    return {e.name: (pb.DataType.Name(e.data_type), tuple(e.dims)) for e in entries}


def check_graph_config(text: str, io: GraphIO, where: str) -> Any:
    """Parse ``text`` and check that its inputs/outputs are exactly the graph's (names, data
    types, dims with the batch dim removed when ``max_batch_size`` > 0)."""
    cfg = parse_config(text, where)
    skip = 1 if cfg.max_batch_size > 0 else 0
    for label, entries, graph in (
        ("input", cfg.input, io.inputs),
        ("output", cfg.output, io.outputs),
    ):
        want = {t.name: (t.data_type, t.dims[skip:]) for t in graph}
        got = _tensors(entries)
        if got != want:
            diff = sorted(
                n for n in set(got) | set(want) if got.get(n) != want.get(n)
            )  # names whose type or dims differ, or that only one side has
            raise LpDeployError(
                f"{where}: the {label}s do not match the ONNX graph ({', '.join(diff[:6])}: "
                f"config {[got.get(n) for n in diff[:3]]}, graph {[want.get(n) for n in diff[:3]]})"
            )
    return cfg


def check_generate_config(text: str, where: str) -> Any:
    """Parse ``text`` and check the generate model's interface (decoupled, inputs, outputs)."""
    cfg = parse_config(text, where)
    want_in = {n: (t, d) for n, t, d, _ in GENERATE_INPUTS}
    want_out = {n: (t, d) for n, t, d in GENERATE_OUTPUTS}
    if _tensors(cfg.input) != want_in or _tensors(cfg.output) != want_out:
        raise LpDeployError(f"{where}: inputs/outputs differ from the generate interface")
    if not cfg.model_transaction_policy.decoupled or cfg.backend != "python":
        raise LpDeployError(f"{where}: the generate model must be a decoupled python model")
    return cfg
