"""Stage ``export onnx``: a (patched or dense) model as an ONNX graph with a KV cache.

The graph has inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key/value`` (a zero-length past for prefill) and outputs ``logits``
and ``present.{i}.key/value`` (the optimum / ONNX Runtime GenAI naming), with named dynamic
dims ``batch_size``, ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``.
Everything is written to a temporary sibling of ``out``, validated in ONNX Runtime against
PyTorch on real text, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy import __version__
from lp_deploy.artifacts import (
    CONFIG_FILE,
    EXPORT_REPORT_FILE,
    MANIFEST_FILE,
    META_KEY,
    ONNX_DATA_FILE,
    ONNX_FILE,
    Kind,
    check_out,
    inspect_artifact,
    output_dir,
)
from lp_deploy.calibration import tokenize_text
from lp_deploy.data import data_file
from lp_deploy.errors import DataError, LpDeployError, VerificationError
from lp_deploy.exporters.quantize import QuantizeConfig, QuantReport, quantize_export
from lp_deploy.hf_config import save_config
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.runtimes.base import DTYPES, Past, positions_from_mask
from lp_deploy.runtimes.torch_runtime import TorchRuntime, cache_tensors, full_cache
from lp_deploy.sources import check_tokenizer_files

log = logging.getLogger(__name__)

DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
#: protobuf cannot hold more than 2 GiB: larger graphs keep their weights in model.onnx.data
EXTERNAL_DATA_BYTES = 2**31 - 2**26
VALIDATION_TEXT = "wikitext-2/test.txt"
FALLBACK_TEXT = (
    "The history of the river valley begins with the first farming villages, built on the "
    "high ground above the flood plain. Over the following centuries the settlements grew "
    "into small market towns connected by roads and ferries, and a stone bridge was built "
    "near the old church. During the industrial period the valley became known for its "
    "mills, which used the water to power looms and saws, and a railway line was opened to "
    "carry coal and timber to the coast. Many of the workers came from the surrounding "
    "counties, and the population of the largest town doubled within twenty years. After "
    "the mills closed, the buildings were converted into housing, a museum and a school, "
    "and the river is now used mainly for fishing, rowing and walking along its banks. "
)


@dataclass
class OnnxExportConfig:
    """Options of ``lp-deploy export onnx``.

    ``optimize``: 0/False none (but always RMSNorm's ``rsqrt`` rewritten as ``Sqrt`` -> ``Div``,
    :func:`rsqrt_as_div`, which ONNX Runtime fuses at session load); 1/True onnxscript's ONNX
    Runtime fusions (RMSNorm, skip RMSNorm, rotary embedding, attention); 2 additionally ONNX
    Runtime's own extended graph optimisation, saved to disk (ties the file to the onnxruntime
    version and CPU/CUDA).
    ``tolerance``: max |logit diff| against PyTorch fp32; default per dtype, see
    :func:`tolerances`.
    """

    model: str
    out: Path
    overwrite: bool = False
    dtype: str = "fp32"
    optimize: bool | int = False
    opset: int = 20
    validate: bool = True
    prefill_tokens: int = 128
    decode_steps: int = 8
    text: str | None = None
    tolerance: float | None = None
    external_data: bool | None = None  # None: only when the weights exceed ~2 GB
    quantize: QuantizeConfig | None = None  # int8 / int4 after the fp32 export is validated


@dataclass
class ValidationReport:
    """ONNX Runtime vs PyTorch (fp32) on real text; all values are max |difference|."""

    text: str
    prefill_tokens: int
    decode_steps: int
    prefill_logits: float
    decode_logits: float
    padded_batch_logits: float
    present_kv: float
    logit_scale: float
    kv_scale: float
    tolerance: float
    kv_tolerance: float
    decode_argmax_agreement: float
    reference_lowp: dict[str, float] | None = None  # PyTorch fp16/bf16 vs fp32, same protocol
    passed: bool = False


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and measured (saved as ``export.json``)."""

    source: str
    dtype: str
    opset: int
    optimize: int
    num_layers: int
    patches: list[dict[str, Any]]
    external_data: bool
    onnx_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    fusions: dict[str, int] = field(default_factory=dict)
    value_info_dropped: int = 0  # intermediate shapes removed from the graph (drop_value_info)
    validation: ValidationReport | None = None  # the fp32 graph against PyTorch
    quantization: QuantReport | None = None  # the quantized graph against the fp32 one
    quantized_from: str | None = None  # the fp32 export quantized (no new trace)


def tolerances(
    dtype: str, logit_scale: float, kv_scale: float, budget: dict[str, float] | None = None
) -> tuple[float, float]:
    """(logit, KV) tolerances of ONNX Runtime against the fp32 PyTorch model.

    fp32: 1e-3 absolute (measured ~1e-4 on SmolLM2, logits ~20).
    fp16/bf16: the export may not add more error than casting the PyTorch model to that
    dtype does: 2x the max |difference| of PyTorch-fp16 vs PyTorch-fp32 on the same inputs
    (``budget``; two independent low-precision implementations round differently, so their
    errors are of the same size but not equal), and at least 0.5% of the largest |value|
    (fp16 keeps 11 significant bits: 0.016 at a logit of 20). Without a budget: 1% (fp16)
    or 4% (bf16, 8 significant bits) of the largest |value|.
    """
    if dtype == "fp32":
        return 1e-3, 1e-3
    floor = 0.005 * max(1.0, logit_scale), 0.005 * max(1.0, kv_scale)
    if budget is None:
        rel = 0.01 if dtype == "fp16" else 0.04
        return rel * max(1.0, logit_scale), rel * max(1.0, kv_scale)
    return max(2 * _logits_worst(budget), floor[0]), max(2 * budget["present_kv"], floor[1])


# --------------------------------------------------------------------------- tracing


class KVCacheWrapper(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *flat_past)`` ->
    ``(logits, *flat_present)``; the flat past is rebuilt into a ``DynamicCache``."""

    def __init__(self, model: PreTrainedModel, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *flat_past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = full_cache(self.model)
        for i in range(self.num_layers):
            cache.update(flat_past[2 * i], flat_past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        flat = [t for kv in cache_tensors(out.past_key_values) for t in kv]
        return (out.logits, *flat)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names."""
    kv = [(i, k) for i in range(num_layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [f"past_key_values.{i}.{k}" for i, k in kv]
    return inputs, ["logits", *[f"present.{i}.{k}" for i, k in kv]]


def kv_layout(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's cache, read from a tiny forward pass."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    past = cache_tensors(out.past_key_values)
    return len(past), int(past[0][0].shape[1]), int(past[0][0].shape[3])


def sample_inputs(
    model: PreTrainedModel, layout: tuple[int, int, int]
) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Trace inputs (batch 2, 3 new tokens, past 5: distinct sizes above 1 keep every dim
    symbolic) and their named dynamic dims."""
    layers, kv_heads, head_dim = layout
    batch, seq, past_len = 2, 3, 5
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [
        torch.randn(batch, kv_heads, past_len, head_dim, generator=gen).to(dtype)
        for _ in range(2 * layers)
    ]
    b, s, p, t = DIMS
    dyn = (
        {0: b, 1: s},
        {0: b, 1: t},
        {0: b, 1: s},
        tuple({0: b, 2: p} for _ in range(2 * layers)),
    )
    return (ids, mask, pos, *past), dyn


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter libraries' INFO chatter and deprecation warnings."""
    names = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def traceable_experts(model: PreTrainedModel) -> Iterator[None]:
    """Mixture-of-experts models run their experts as ``batched_mm`` while traced (every
    token gathers its experts' weights: no data-dependent loop, no custom op)."""
    current = getattr(model.config, "_experts_implementation", None)
    if current is None or current == "batched_mm":
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def trace(model: PreTrainedModel, opset: int) -> Any:
    """``torch.onnx.export(..., dynamo=True)`` of the KV-cache wrapper (an ``ONNXProgram``)."""
    layout = kv_layout(model)
    args, dyn = sample_inputs(model, layout)
    inputs, outputs = io_names(layout[0])
    wrapper = KVCacheWrapper(model, layout[0]).eval()
    with torch.no_grad(), quiet_exporter(), traceable_experts(model):
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dyn,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise LpDeployError("torch.onnx.export returned no program")
    return program


def name_total_dims(model: Any) -> None:
    """``present.*`` dim 2 is ``past_sequence_length + sequence_length``: name it."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        if value.name.startswith("present.") and value.shape is not None:
            dims = list(value.shape)
            dims[2] = ir.SymbolicDim(DIMS[3])
            value.shape = ir.Shape(dims)


# --------------------------------------------------------------------------- optimisation


def fuse_for_ort(model: Any) -> tuple[Any, dict[str, int]]:
    """onnxscript's ONNX Runtime fusions; returns the model and the fusions that applied."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with quiet_exporter():
        fused, counts = optimize_for_ort(model)
    return fused, {k: int(v) for k, v in counts.items() if v}


def _rsqrt_as_div_rule() -> Any:
    """``Mul(y, Reciprocal(Sqrt(x)))`` (either order) -> ``Div(y, Sqrt(x))``: the form ONNX
    Runtime's SimplifiedLayerNormalization fusion (at session load) matches; the dynamo
    exporter writes RMSNorm's ``rsqrt`` the other way. Exact up to rounding."""
    from onnxscript.rewriter import pattern

    def target(op: Any, y: Any, x: Any) -> Any:
        return op.Mul(y, op.Reciprocal(op.Sqrt(x)))

    def replacement(op: Any, y: Any, x: Any) -> Any:
        return op.Div(y, op.Sqrt(x))

    return pattern.RewriteRule(target, replacement, name="RsqrtAsDiv")


def rsqrt_as_div(model: Any) -> dict[str, int]:
    """Applies :func:`_rsqrt_as_div_rule` in place; returns ``{"rsqrt_as_div": count}`` (or {})."""
    from onnxscript.rewriter import pattern

    count = pattern.RewriteRuleSet([_rsqrt_as_div_rule()], commute=True).apply_to_model(model)
    return {"rsqrt_as_div": int(count)} if count else {}


def ort_offline_optimize(path: Path, external: bool) -> dict[str, int]:
    """ONNX Runtime's extended graph optimisation, written back over ``path``."""
    import onnx

    from lp_deploy.runtimes.ort_runtime import import_ort

    ort = import_ort()
    work = path.parent / ".ort-optimized"
    work.mkdir()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(work / path.name)
    if external:
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{path.name}.data"
        )
    before = _file_op_counts(onnx, path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for produced in work.iterdir():
        os.replace(produced, path.parent / produced.name)
    work.rmdir()
    after = _file_op_counts(onnx, path)
    return {f"ort:{k}": v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}


def drop_value_info(path: Path) -> int:
    """Remove the shapes of intermediate values (``graph.value_info``) from the graph file at
    ``path``, in place; returns how many. They are optional: ONNX Runtime infers its own at
    load. With the ones the dynamo exporter writes (one dimension spelled several ways, 740 of
    them unknown on SmolLM2), ONNX Runtime ran the attention's data-movement ops (rotary
    Neg/Concat/Mul, mask Add, Transpose, Expand) 2-3x slower per call: prefill(128) took
    0.960-0.974x as long without them in 8 of 8 processes (README, optimum peer). Outputs are
    bit-identical."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = len(model.graph.value_info)
    if count:
        del model.graph.value_info[:]
        onnx.save(model, str(path))
    return count


def external_data_locations(path: Path) -> set[str]:
    """The files (relative to ``path``'s folder) that ``path``'s external initializers name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        entry.value
        for init in graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }


def check_self_contained(path: Path) -> None:
    """Every external initializer of ``path`` lives in ``model.onnx.data`` beside it (and
    that file exists when any does): the export directory can be moved as a whole."""
    locations = external_data_locations(path)
    stray = sorted(locations - {ONNX_DATA_FILE})
    if stray:
        raise VerificationError(
            f"{path.name} keeps weights outside {ONNX_DATA_FILE}: {stray}; the export would "
            "not be self-contained. Nothing was written."
        )
    if locations and not (path.parent / ONNX_DATA_FILE).is_file():
        raise VerificationError(f"{path.name} refers to {ONNX_DATA_FILE}, which was not written")


def _file_op_counts(onnx: Any, path: Path) -> Counter[str]:
    """Node count per ``domain:op_type`` (empty domain for standard ONNX ops)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node)


# --------------------------------------------------------------------------- validation


def validation_ids(
    tokenizer: PreTrainedTokenizerBase, spec: str | None, n: int, repeat: bool = True
) -> tuple[torch.Tensor, str]:
    """At least ``n`` token ids of real text: ``spec``, else wikitext-2 test, else a fixed
    English paragraph (repeated as needed; with ``repeat=False`` at most ``n``, never
    repeated)."""
    try:
        path = data_file(spec or VALIDATION_TEXT)
        text, name = path.read_text(encoding="utf-8")[: max(20_000, 40 * n)], str(path)
    except DataError:
        if spec:
            raise
        text, name = FALLBACK_TEXT, "built-in English paragraph"
    ids = tokenize_text(tokenizer, text)
    if ids.numel() == 0:
        raise LpDeployError(f"validation text {name} has no tokens")
    if not repeat:
        return ids[:n], name
    reps = -(-n // ids.numel())
    return ids.repeat(reps)[:n], name


@dataclass
class RunTrace:
    """One runtime's outputs on the validation protocol."""

    prefill: torch.Tensor
    decode: torch.Tensor
    padded: torch.Tensor
    kv_prefill: Past
    kv_final: Past


def _run(rt: Any, ids: torch.Tensor, n: int, steps: int) -> RunTrace:
    """Prefill ``n`` tokens, ``steps`` teacher-forced decode steps, and a padded batch."""
    logits, past = _step(rt, ids[:n][None], 0, None)
    kv_prefill, decode = past, []
    for k in range(steps):
        step_logits, past = _step(rt, ids[n + k].reshape(1, 1), n + k, past)
        decode.append(step_logits[0, -1])
    return RunTrace(
        prefill=logits[0],
        decode=torch.stack(decode) if decode else torch.zeros(0),
        padded=_padded_run(rt, ids),
        kv_prefill=kv_prefill,
        kv_final=past,
    )


def _step(rt: Any, ids: torch.Tensor, start: int, past: Past | None) -> tuple[torch.Tensor, Past]:
    n = ids.shape[1]
    mask = torch.ones(ids.shape[0], start + n, dtype=torch.long)
    return rt.forward(ids, mask, torch.arange(start, start + n).expand(ids.shape[0], n), past)


def _padded_run(rt: Any, ids: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """Batch 2 (second row left-padded by ``pad``): prefill then one decode step; logits at
    real positions (padded ones zeroed)."""
    n = min(48, ids.numel() - 1)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    batch = torch.stack([ids[:n], torch.cat([torch.zeros(pad, dtype=torch.long), ids[: n - pad]])])
    logits, past = rt.forward(batch, mask, positions_from_mask(mask), None)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    nxt = torch.stack([ids[n], ids[n - pad]]).reshape(2, 1)
    step, _ = rt.forward(nxt, mask2, positions_from_mask(mask2)[:, -1:], past)
    return torch.cat([logits * mask[..., None], step], dim=1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _kv_diff(a: Past, b: Past) -> float:
    return max(
        _max_diff(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True)
    )


def _kv_scale(past: Past) -> float:
    return max(float(t.float().abs().max()) for kv in past for t in kv)


def compare(a: RunTrace, b: RunTrace) -> dict[str, float]:
    """Max |difference| per part of the protocol."""
    return {
        "prefill_logits": _max_diff(a.prefill, b.prefill),
        "decode_logits": _max_diff(a.decode, b.decode),
        "padded_batch_logits": _max_diff(a.padded, b.padded),
        "present_kv": max(_kv_diff(a.kv_prefill, b.kv_prefill), _kv_diff(a.kv_final, b.kv_final)),
    }


def _logits_worst(d: dict[str, float]) -> float:
    return max(d["prefill_logits"], d["decode_logits"], d["padded_batch_logits"])


def validate(
    ort_rt: Any,
    ref: Any,
    ids: torch.Tensor,
    cfg: OnnxExportConfig,
    text: str,
    ref_lowp: Any | None = None,
) -> ValidationReport:
    """ONNX Runtime vs PyTorch fp32; ``ref_lowp`` (PyTorch in the export dtype) sets the
    tolerance of fp16/bf16 exports."""
    got, want = (_run(rt, ids, cfg.prefill_tokens, cfg.decode_steps) for rt in (ort_rt, ref))
    diffs = compare(got, want)
    scale = max(float(want.prefill.abs().max()), float(want.padded.abs().max()))
    kv_scale = max(_kv_scale(want.kv_prefill), _kv_scale(want.kv_final))
    budget = None
    if ref_lowp is not None:
        budget = compare(_run(ref_lowp, ids, cfg.prefill_tokens, cfg.decode_steps), want)
    tol, kv_tol = tolerances(cfg.dtype, scale, kv_scale, budget)
    if cfg.tolerance is not None:
        tol = cfg.tolerance
    agree = got.decode.argmax(-1) == want.decode.argmax(-1)
    report = ValidationReport(
        text=text,
        prefill_tokens=cfg.prefill_tokens,
        decode_steps=cfg.decode_steps,
        prefill_logits=diffs["prefill_logits"],
        decode_logits=diffs["decode_logits"],
        padded_batch_logits=diffs["padded_batch_logits"],
        present_kv=diffs["present_kv"],
        logit_scale=scale,
        kv_scale=kv_scale,
        tolerance=tol,
        kv_tolerance=kv_tol,
        decode_argmax_agreement=float(agree.float().mean()) if agree.numel() else 1.0,
        reference_lowp=budget,
    )
    report.passed = _logits_worst(diffs) <= tol and diffs["present_kv"] <= kv_tol
    return report


def _raise_failed(report: ValidationReport, optimized: bool) -> None:
    hint = " (the optimized graph: re-export without --optimize)" if optimized else ""
    raise VerificationError(
        f"ONNX Runtime output differs from PyTorch{hint}: max |logit diff| prefill "
        f"{report.prefill_logits:.3e}, decode {report.decode_logits:.3e}, padded batch "
        f"{report.padded_batch_logits:.3e} (tolerance {report.tolerance:.1e}); max |KV diff| "
        f"{report.present_kv:.3e} (tolerance {report.kv_tolerance:.1e}). Nothing was written."
    )


# --------------------------------------------------------------------------- files


def _export_meta(
    loaded: LoadedModel, cfg: OnnxExportConfig, layout: tuple[int, ...]
) -> dict[str, Any]:
    inputs, outputs = io_names(layout[0])
    export = {
        "format": "onnx",
        "dtype": cfg.dtype,
        "opset": cfg.opset,
        "optimize": int(cfg.optimize),
        "num_layers": layout[0],
        "num_key_value_heads": layout[1],
        "head_dim": layout[2],
        "inputs": inputs,
        "outputs": outputs,
        "dims": list(DIMS),
        "quantization": _quant_meta(cfg.quantize),
        "source": str(cfg.model),
        "toolkit_version": __version__,
    }
    return {**copy.deepcopy(loaded.meta), "export": export}


def _quant_meta(q: QuantizeConfig | None) -> dict[str, Any] | None:
    if q is None:
        return None
    meta: dict[str, Any] = {"mode": q.mode, "exclude": list(q.exclude)}
    if q.blockwise:
        meta.update(method="block", block_size=q.block_size, accuracy_level=q.level)
        if q.fallback != "fp32":
            meta.update(fallback=q.fallback)
    else:
        meta.update(method="dynamic")
    return meta


def _write_side_files(
    loaded: LoadedModel, meta: dict[str, Any], dtype: torch.dtype, tmp: Path
) -> None:
    config = copy.deepcopy(loaded.model.config)
    setattr(config, META_KEY, meta)
    config.dtype = dtype
    config.use_cache = True
    save_config(config, tmp)
    if loaded.model.generation_config is not None:
        loaded.model.generation_config.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)


def _param_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


# --------------------------------------------------------------------------- entry point


def _load(cfg: OnnxExportConfig) -> LoadedModel:
    if cfg.dtype not in DTYPES:
        raise LpDeployError(
            f"unsupported dtype {cfg.dtype!r} for the ONNX export; choose one of "
            f"{', '.join(DTYPES)}"
        )
    if cfg.dtype == "bf16" and cfg.validate:
        raise LpDeployError(
            "a bf16 graph cannot be validated: ONNX Runtime's CPU provider has no bf16 "
            "kernels; export fp32 or fp16, or pass validate=False (--no-validate)"
        )
    if cfg.quantize is not None:
        cfg.quantize.check()
        if cfg.dtype != "fp32":
            raise LpDeployError(
                f"--quantize {cfg.quantize.mode} quantizes an fp32 graph; drop --dtype {cfg.dtype}"
            )
    if int(cfg.optimize) not in (0, 1, 2):
        raise LpDeployError(f"optimize must be 0, 1 or 2, got {cfg.optimize!r}")
    check_out(cfg.out, Kind.ONNX, cfg.overwrite)
    loaded = load_model(cfg.model, torch.float32)
    return loaded


@dataclass
class ExportResult:
    """Where the export was written and what it measured."""

    out: Path
    report: ExportReport


def export_onnx(cfg: OnnxExportConfig) -> ExportResult:
    """Export, optimise (optional), validate and publish ``cfg.out``. With ``quantize`` and an
    fp32 ONNX export as ``model``, only quantizes that export (no new trace)."""
    started = time.perf_counter()
    if cfg.quantize is not None and _is_onnx_export(cfg.model):
        return _quantize_existing(cfg, started)
    loaded = _load(cfg)
    out = Path(cfg.out).expanduser()
    with output_dir(out, Kind.ONNX, cfg.overwrite) as tmp:
        report = _build(loaded, cfg, tmp, started)
        (tmp / EXPORT_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    log.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return ExportResult(out, report)


def _build(loaded: LoadedModel, cfg: OnnxExportConfig, tmp: Path, started: float) -> ExportReport:
    import onnx_ir as ir

    dtype = DTYPES[cfg.dtype]
    model = loaded.model if dtype == torch.float32 else copy.deepcopy(loaded.model).to(dtype)
    layout = kv_layout(model)
    meta = _export_meta(loaded, cfg, layout)
    external = (
        cfg.external_data
        if cfg.external_data is not None
        else _param_bytes(model, dtype) > EXTERNAL_DATA_BYTES
    )
    seconds: dict[str, float] = {"load": time.perf_counter() - started}
    t0 = time.perf_counter()
    program = trace(model, cfg.opset)
    seconds["trace"] = time.perf_counter() - t0
    graph = program.model
    name_total_dims(graph)
    graph.metadata_props[META_KEY] = json.dumps(meta, sort_keys=True)
    fusions: dict[str, int] = {}
    if int(cfg.optimize) >= 1:
        t0 = time.perf_counter()
        graph, fusions = fuse_for_ort(graph)
        seconds["fuse"] = time.perf_counter() - t0
    fusions.update(rsqrt_as_div(graph))  # what onnxscript's fusions left, for ORT's own
    path = tmp / ONNX_FILE
    t0 = time.perf_counter()
    ir.save(graph, str(path), external_data=ONNX_DATA_FILE if external else None)
    seconds["save"] = time.perf_counter() - t0
    del program, graph
    if int(cfg.optimize) >= 2:
        t0 = time.perf_counter()
        fusions.update(ort_offline_optimize(path, external))
        seconds["ort_optimize"] = time.perf_counter() - t0
    value_info_dropped = drop_value_info(path)
    check_self_contained(path)
    _write_side_files(loaded, meta, dtype, tmp)
    report = ExportReport(
        source=str(cfg.model),
        dtype=cfg.dtype,
        opset=cfg.opset,
        optimize=int(cfg.optimize),
        num_layers=layout[0],
        patches=list(loaded.meta.get("patches", [])),
        external_data=external,
        onnx_bytes=sum(f.stat().st_size for f in tmp.glob(f"{ONNX_FILE}*")),
        fusions=fusions,
        value_info_dropped=value_info_dropped,
    )
    if cfg.validate:
        t0 = time.perf_counter()
        report.validation = run_validation(loaded, cfg, tmp, model)
        seconds["validate"] = time.perf_counter() - t0
    if cfg.quantize is not None:
        t0 = time.perf_counter()
        report.quantization = quantize_export(tmp, cfg.quantize, loaded.tokenizer, cfg.validate)
        report.onnx_bytes = report.quantization.onnx_bytes
        seconds["quantize"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return report


def _is_onnx_export(source: str | Path) -> bool:
    try:
        return inspect_artifact(source).kind == Kind.ONNX
    except LpDeployError:
        return False


def _quantize_existing(cfg: OnnxExportConfig, started: float) -> ExportResult:
    """Quantize the fp32 export ``cfg.model`` into ``cfg.out`` (side files copied, the
    ``export`` record of config.json and export.json extended by the quantization)."""
    from transformers import AutoTokenizer

    assert cfg.quantize is not None
    cfg.quantize.check()
    src = Path(cfg.model).expanduser()
    report = read_report(src)
    if report.get("quantization") or report.get("dtype") != "fp32":
        raise LpDeployError(
            f"{src} is not an fp32 export (dtype {report.get('dtype')}, quantization "
            f"{(report.get('quantization') or {}).get('mode')}); quantize the fp32 export"
        )
    check_tokenizer_files(src)  # else AutoTokenizer may build an empty one from model_type
    check_out(cfg.out, Kind.ONNX, cfg.overwrite)
    out = Path(cfg.out).expanduser()
    with output_dir(out, Kind.ONNX, cfg.overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in (MANIFEST_FILE, EXPORT_REPORT_FILE):
                shutil.copy2(f, tmp / f.name)
        _record_quantization(tmp / CONFIG_FILE, cfg.quantize)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        quant = quantize_export(tmp, cfg.quantize, tokenizer, cfg.validate)
        result = _report_from(report, quant, src, time.perf_counter() - started)
        (tmp / EXPORT_REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return ExportResult(out, result)


def _report_from(
    fp32: dict[str, Any], quant: QuantReport, src: Path, seconds: float
) -> ExportReport:
    """The fp32 export's report (its validation against PyTorch kept) plus the quantization."""
    fields = {k: v for k, v in fp32.items() if k in ExportReport.__dataclass_fields__}
    validation = fields.pop("validation", None)
    fields.update(
        validation=ValidationReport(**validation) if validation else None,
        quantization=quant,
        onnx_bytes=quant.onnx_bytes,
        quantized_from=str(src),
        seconds={"quantize": round(seconds, 2), "total": round(seconds, 2)},
    )
    return ExportReport(**fields)


def _record_quantization(config_file: Path, q: QuantizeConfig) -> None:
    config = json.loads(config_file.read_text())
    config[META_KEY]["export"]["quantization"] = _quant_meta(q)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_validation(
    loaded: LoadedModel, cfg: OnnxExportConfig, tmp: Path, exported: PreTrainedModel
) -> ValidationReport:
    """Validate the files in ``tmp`` (``exported``: the traced model, in the export dtype);
    raises :class:`VerificationError` on a mismatch."""
    from lp_deploy.runtimes.ort_runtime import CPU, OrtRuntime

    ort_rt = OrtRuntime(tmp, providers=[CPU])
    ref = TorchRuntime(loaded.model, loaded.tokenizer)
    lowp = None if exported is loaded.model else TorchRuntime(exported, loaded.tokenizer)
    n = cfg.prefill_tokens + cfg.decode_steps + 1
    ids, text = validation_ids(loaded.tokenizer, cfg.text, max(n, 64))
    report = validate(ort_rt, ref, ids, cfg, text, lowp)
    log.info(
        "validation (%s): max |logit diff| prefill %.2e decode %.2e padded %.2e, KV %.2e "
        "(tolerance %.1e)",
        cfg.dtype,
        report.prefill_logits,
        report.decode_logits,
        report.padded_batch_logits,
        report.present_kv,
        report.tolerance,
    )
    if not report.passed:
        _raise_failed(report, int(cfg.optimize) > 0)
    return report


def read_report(export_dir: Path) -> dict[str, Any]:
    """The ``export.json`` of an export directory."""
    data: dict[str, Any] = json.loads((Path(export_dir) / EXPORT_REPORT_FILE).read_text())
    return data


__all__ = [
    "ExportReport",
    "ExportResult",
    "OnnxExportConfig",
    "ValidationReport",
    "export_onnx",
    "read_report",
    "tolerances",
]
