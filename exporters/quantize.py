"""Quantized ONNX exports, made with ONNX Runtime's own tools and validated on real text.

* ``int8`` (default method ``block``): ONNX Runtime's ``MatMulNBitsQuantizer`` with 8 bits:
  block-wise int8 weights in ``MatMulNBits`` (``block_size`` 32/64/128); ``accuracy_level``
  4 (its default here) also quantizes the activations to int8 inside the kernel, the fast
  path on CPU (level 0 dequantizes the weights on every call: correct but slower than fp32).
  Method ``dynamic``: :func:`onnxruntime.quantization.quantize_dynamic`: int8 weights with
  one scale per tensor (``per_channel`` on request), activations quantized at run time
  (``DynamicQuantizeLinear`` + ``MatMulInteger``).
* ``int4``: the same ``MatMulNBitsQuantizer`` with 4 bits (accuracy level 0 by default).

Only the MatMuls with a constant weight are quantized; a tied ``lm_head`` (a Transpose of the
embedding table) is given its own copy of the table first, block-wise only (the embedding's
Gather keeps the fp32 table; ``exclude=("lm_head",)`` leaves it tied and fp32, or with
``fallback="int8"`` quantizes its copy to 8 bits). The graph's
inputs and outputs (the KV-cache IO) are unchanged. Exact logit tolerances do not apply to a
quantized graph, so it is validated against the fp32 graph it was made from, both in ONNX
Runtime, on real text:
perplexity change and greedy (next-token argmax) agreement over ``windows`` windows of
``seqlen`` tokens. The default limits (:data:`DEFAULT_LIMITS`) are the accuracy goals of
issue 11: at most +5% perplexity for int8, +10% for int4, and at least 80% agreement.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.artifacts import ONNX_DATA_FILE, ONNX_FILE
from lp_deploy.errors import LpDeployError, VerificationError
from lp_deploy.perplexity import LogitsFn, perplexity_of, window_nll

log = logging.getLogger(__name__)

QUANT_MODES = ("int8", "int4")
INT8_METHODS = ("block", "dynamic")
#: precision of the weights kept out of int4 (--exclude, --auto-exclude)
FALLBACKS = ("fp32", "int8")
#: the sensitivity scan's unit: one decoder layer's projections, or one kind across the layers
SCAN_UNITS = ("layer", "kind")
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 4)
#: accuracy level when none is given (block-wise int8 is fast on CPU only with level 4)
DEFAULT_ACCURACY_LEVEL = {"int8": 4, "int4": 0}
#: (max relative perplexity increase, min greedy-token agreement) per mode
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {"int8": (0.05, 0.80), "int4": (0.10, 0.80)}
#: weights lp-deploy itself adds that must stay exact (the online Hadamard transform)
#: (its module from the name scopes, or its initializer's name when a MatMul has none)
ALWAYS_EXCLUDED = ("*.online_hadamard", "*.online_hadamard.*")
#: the export traces a wrapper whose ``model`` attribute is the Hugging Face model
WRAPPER_PREFIX = "model."
REFERENCE_DIR = ".fp32-reference"


@dataclass
class QuantizeConfig:
    """How to quantize an fp32 export (``lp-deploy export onnx ... --quantize``).

    ``exclude``: weights kept in fp32, as module names or glob patterns matched against the
    module that owns the weight (``lm_head``, ``down_proj`` = every layer's, ``layers.3.*``).
    ``max_ppl_increase`` / ``min_agreement``: validation limits; None takes
    :data:`DEFAULT_LIMITS`.
    """

    mode: str
    block_size: int = 32
    accuracy_level: int | None = None  # None: DEFAULT_ACCURACY_LEVEL of the mode
    int8_method: str = "block"  # int8 only: block (MatMulNBits) or dynamic (quantize_dynamic)
    exclude: tuple[str, ...] = ()
    max_ppl_increase: float | None = None
    min_agreement: float | None = None
    text: str | None = None  # None: wikitext-2 test (a built-in paragraph when absent)
    windows: int = 8
    seqlen: int = 512
    auto_exclude: int = 0  # keep the N most sensitive groups out (a sensitivity scan)
    scan_by: str = "layer"  # the scan's group: layer (model.layers.3) or kind (q_proj)
    fallback: str = "fp32"  # int4: precision of the weights kept out: fp32 or int8 (block)
    #: dynamic int8 per-channel weight scales; off by default: with onnxruntime 1.32 per-channel
    #: MatMulInteger graphs came out far less accurate than per-tensor ones (SmolLM2:
    #: perplexity 27.6 -> 1.6e6, greedy agreement 0%), see docs/results/quantization.md
    per_channel: bool = False
    scan_windows: int = 2  # windows per group of the scan

    def check(self) -> None:
        """Clear errors for options the quantizers do not support."""
        if self.mode not in QUANT_MODES:
            raise LpDeployError(
                f"unsupported quantization {self.mode!r}; choose one of {', '.join(QUANT_MODES)}"
            )
        if self.mode == "int8" and self.int8_method not in INT8_METHODS:
            raise LpDeployError(
                f"unsupported int8 method {self.int8_method!r}; choose one of "
                f"{', '.join(INT8_METHODS)}"
            )
        if self.block_size not in BLOCK_SIZES:
            raise LpDeployError(
                f"block size {self.block_size} is not supported; choose one of "
                f"{', '.join(map(str, BLOCK_SIZES))} (weights per scale)"
            )
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise LpDeployError(
                f"accuracy level {self.accuracy_level} is not supported; choose 0 (fp32 "
                "activations) or 4 (int8 activations)"
            )
        if not self.blockwise and self.accuracy_level is not None:
            raise LpDeployError(
                "--accuracy-level applies to block-wise quantization (MatMulNBits); dynamic "
                "int8 always quantizes the activations: drop it or use --int8-method block"
            )
        if self.fallback not in FALLBACKS or self.scan_by not in SCAN_UNITS:
            raise LpDeployError(
                f"fallback must be one of {', '.join(FALLBACKS)} and scan_by one of "
                f"{', '.join(SCAN_UNITS)}; got {self.fallback!r} and {self.scan_by!r}"
            )
        if self.fallback == "int8" and self.mode != "int4":
            raise LpDeployError(
                "--fallback int8 keeps weights out of int4 in block-wise int8; it needs "
                "--quantize int4 (with --quantize int8 the weights kept out stay fp32)"
            )
        if self.per_channel and self.blockwise:
            raise LpDeployError("per_channel applies to dynamic int8 only (int8_method='dynamic')")
        ppl, agree = self.limits()
        if not (ppl >= 0 and math.isfinite(ppl)) or not 0 <= agree <= 1:
            raise LpDeployError(
                f"validation limits must be a perplexity increase >= 0 and an agreement in "
                f"[0, 1]; got {ppl} and {agree}"
            )
        if self.auto_exclude < 0 or self.scan_windows < 1:
            raise LpDeployError("auto_exclude must be >= 0 and scan_windows >= 1")
        if self.windows < 1 or self.seqlen < 2:
            raise LpDeployError("quantization validation needs >= 1 window of >= 2 tokens")

    @property
    def blockwise(self) -> bool:
        """Block-wise weights in MatMulNBits (int4, and int8 by the default method)."""
        return self.mode == "int4" or self.int8_method == "block"

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    @property
    def level(self) -> int | None:
        """The accuracy level used (None for dynamic int8, which has none)."""
        if not self.blockwise:
            return None
        if self.accuracy_level is not None:
            return self.accuracy_level
        return DEFAULT_ACCURACY_LEVEL[self.mode]

    def limits(self) -> tuple[float, float]:
        """(max relative perplexity increase, min greedy-token agreement)."""
        ppl, agree = DEFAULT_LIMITS.get(self.mode, (0.0, 1.0))
        return (
            ppl if self.max_ppl_increase is None else self.max_ppl_increase,
            agree if self.min_agreement is None else self.min_agreement,
        )


@dataclass
class QuantValidation:
    """Quantized vs fp32 graph, both in ONNX Runtime, on the same windows of real text."""

    text: str
    windows: int
    seqlen: int
    fp32_perplexity: float
    perplexity: float
    perplexity_increase: float  # relative
    token_agreement: float  # next-token argmax, all positions
    max_perplexity_increase: float
    min_token_agreement: float
    passed: bool = False


@dataclass
class QuantReport:
    """What was quantized and how (the ``quantization`` record of ``export.json``)."""

    mode: str
    method: str  # block (MatMulNBits) or dynamic
    bits: int
    tool: str
    block_size: int | None
    accuracy_level: int | None
    per_channel: bool | None
    quantized: int
    excluded: list[str]
    fallback: str  # precision of the excluded weights: fp32, or int8 (int4 mode)
    fp32_bytes: int
    onnx_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    validation: QuantValidation | None = None
    #: group -> relative perplexity increase when only that group is quantized (the scan)
    sensitivity: dict[str, float] | None = None
    #: the scan's text: ``text``, ``windows`` x ``seqlen`` tokens from ``first_token`` on
    #: (right after the validation windows, never overlapping them)
    scan_data: dict[str, Any] | None = None


# --------------------------------------------------------------------------- the graph


def weight_owner(node: Any, initializer: str) -> str:
    """Module that owns a MatMul's weight, from the exporter's name scopes
    (``model.layers.0.mlp.down_proj``, ``lm_head``); the initializer's name otherwise."""
    props = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    if len(scopes) >= 2 and isinstance(scopes[-2], str) and scopes[-2]:
        module = scopes[-2]
        return module.removeprefix(WRAPPER_PREFIX)
    return initializer.removesuffix(".weight")


def matmul_weights(model: Any) -> dict[str, str]:
    """Node name -> owning module of every MatMul/Gemm whose weight (input B) is an
    initializer, directly or through a Transpose of one: what the quantizers quantize."""
    inits = {i.name for i in model.graph.initializer}
    transposed = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Transpose" and n.input[0] in inits
    }
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        source = weight if weight in inits else transposed.get(weight)
        if source is not None:
            found[node.name] = weight_owner(node, source)
    return found


def _matches(module: str, pattern: str) -> bool:
    return (
        module == pattern
        or module.endswith("." + pattern)
        or fnmatch.fnmatchcase(module, pattern)
        or fnmatch.fnmatchcase(module, "*." + pattern)
    )


def excluded_nodes(weights: dict[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """Nodes whose weight's module matches one of ``patterns`` (and lp-deploy's own exact
    transforms); a user pattern that matches nothing is an error."""
    chosen: dict[str, str] = {}
    for pattern in patterns:
        hits = {n: m for n, m in weights.items() if _matches(m, pattern)}
        if not hits:
            names = sorted(set(weights.values()))
            raise LpDeployError(
                f"--exclude {pattern!r} matches no quantizable weight; the graph's are e.g. "
                f"{', '.join(names[:4])} ... {names[-1] if names else ''}"
            )
        chosen.update(hits)
    chosen.update(
        {n: m for n, m in weights.items() if any(_matches(m, p) for p in ALWAYS_EXCLUDED)}
    )
    return chosen


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _quantize_dynamic(
    src: Path, dst: Path, exclude: list[str], external: bool, per_channel: bool
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude,
        use_external_data_format=external,
        extra_options={"MatMulConstBOnly": True},
    )


def _transpose_perm(node: Any) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def untie_transposed(model: Any, skip: Iterable[str]) -> list[str]:
    """Give every MatMul outside ``skip`` whose weight is a 2-D Transpose of an initializer (a
    tied ``lm_head`` reads the embedding table that way) its own transposed initializer, so that
    the quantizer, which takes constant weights only, quantizes it while the embedding's Gather
    keeps the fp32 table. Exact (the same numbers, stored twice); returns the new names."""
    from onnx import numpy_helper

    graph, skipped = model.graph, set(skip)
    inits = {i.name: i for i in graph.initializer}
    transposes = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Transpose"
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 2
        and _transpose_perm(n) in (None, [1, 0])
    }
    names = _value_names(graph)
    made: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.name in skipped or len(node.input) < 2:
            continue
        source = transposes.get(node.input[1])
        if source is None:
            continue
        if source.output[0] not in made:
            name = _fresh_name(f"{weight_owner(node, source.input[0])}.weight", names)
            names.add(name)
            array = np.ascontiguousarray(numpy_helper.to_array(inits[source.input[0]]).T)
            graph.initializer.append(numpy_helper.from_array(array, name))
            made[source.output[0]] = name
        node.input[1] = made[source.output[0]]
    _drop_unread(graph, [transposes[t] for t in made])
    return list(made.values())


def _value_names(graph: Any) -> set[str]:
    """Every name the graph uses: initializers, inputs, outputs and node inputs/outputs."""
    names = {i.name for i in graph.initializer} | {v.name for v in graph.input}
    names |= {v.name for v in graph.output}
    return names | {x for n in graph.node for x in (*n.input, *n.output)}


def _fresh_name(base: str, names: set[str]) -> str:
    """``base`` (or ``base.untied2``, ...) unless the graph uses it or a name derived from it
    (the quantizer names its outputs ``<weight>_Q4``, ``<weight>_scales``, ...)."""
    name, k = base, 1
    while name in names or any(n.startswith(name + "_") for n in names):
        k += 1
        name = f"{base}.untied{k}"
    return name


def _drop_unread(graph: Any, nodes: list[Any]) -> None:
    """Remove those of ``nodes`` whose outputs nothing reads any more."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in nodes:
        if not read & set(node.output):
            graph.node.remove(node)


def _nbits_pass(
    model: Any, bits: int, level: int | None, cfg: QuantizeConfig, skip: Iterable[str]
) -> Any:
    """One ``MatMulNBitsQuantizer`` pass over the MatMuls not in ``skip`` (a tied weight is
    untied first: :func:`untie_transposed`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    untie_transposed(model, skip)
    quant = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=cfg.block_size,
        is_symmetric=False,  # ONNX Runtime's default: asymmetric, with zero points
        accuracy_level=level,
        nodes_to_exclude=sorted(skip),
    )
    quant.process()
    return quant.model


def _quantize_blockwise(
    src: Path, dst: Path, exclude: list[str], external: bool, cfg: QuantizeConfig, int8: list[str]
) -> None:
    """``cfg.bits`` on every MatMul but ``exclude``; first 8 bits on ``int8`` (a MatMul the
    first pass turned into ``MatMulNBits`` is no MatMul for the second)."""
    import onnx

    model = onnx.load(str(src))
    if int8:
        matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
        model = _nbits_pass(model, 8, DEFAULT_ACCURACY_LEVEL["int8"], cfg, matmuls - set(int8))
        model = model.model
    result = _nbits_pass(model, cfg.bits, cfg.level, cfg, exclude)
    result.save_model_to_file(str(dst), use_external_data_format=external)


def quantize_file(
    src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str], int8: list[str] | None = None
) -> str:
    """Quantize the graph ``src`` into ``dst`` (same directory layout), keeping ``exclude`` in
    fp32 and (block-wise int4 only) quantizing ``int8`` to 8 bits; returns the tool."""
    external = (src.parent / ONNX_DATA_FILE).is_file()
    with quiet_quantizers():
        if cfg.blockwise:
            _quantize_blockwise(src, dst, exclude, external, cfg, int8 or [])
            return "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"
        _quantize_dynamic(src, dst, exclude, external, cfg.per_channel)
    return "onnxruntime.quantization.quantize_dynamic"


@contextlib.contextmanager
def quiet_quantizers() -> Iterator[None]:
    """ONNX Runtime's quantizers log every node at INFO (some on the root logger)."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime.quantization")]
    loggers += [logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def count_quantized(path: Path) -> int:
    """Nodes of the quantized kinds (MatMulInteger, DynamicQuantizeMatMul, MatMulNBits)."""
    kinds = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"}
    return sum(n.op_type in kinds for n in _load(path).graph.node)


# --------------------------------------------------------------------------- validation


def ort_logits_fn(path: Path, threads: int | None = None) -> LogitsFn:
    """Logits of a KV-cache graph for whole windows (empty past), one ORT session."""
    from lp_deploy.runtimes.ort_runtime import CPU, import_ort

    ort = import_ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=[CPU])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    names = {i.name for i in session.get_inputs()}

    def fn(ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        feed: dict[str, np.ndarray] = {
            "input_ids": ids.numpy().astype(np.int64),
            "attention_mask": np.ones((batch, n), dtype=np.int64),
        }
        if "position_ids" in names:
            feed["position_ids"] = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n))
        for p in past:
            feed[p.name] = np.zeros((batch, p.shape[1], 0, p.shape[3]), dtype=np.float32)
        return torch.from_numpy(session.run(["logits"], feed)[0])

    return fn


def compare_on_text(
    reference: LogitsFn, quantized: LogitsFn, windows: torch.Tensor
) -> tuple[float, float, float]:
    """(fp32 perplexity, quantized perplexity, next-token argmax agreement) over windows."""
    nll = [0.0, 0.0]
    count, agree = 0, 0
    for row in windows:
        ids = row[None]
        ref, got = reference(ids), quantized(ids)
        for i, logits in enumerate((ref, got)):
            total, n = window_nll(logits, ids)
            nll[i] += total
        count += n
        agree += int((ref[0, :-1].argmax(-1) == got[0, :-1].argmax(-1)).sum())
    return math.exp(nll[0] / count), math.exp(nll[1] / count), agree / count


def validate_quantized(
    reference: Path, quantized: Path, tokenizer: PreTrainedTokenizerBase, cfg: QuantizeConfig
) -> QuantValidation:
    """Perplexity change and greedy agreement of ``quantized`` against ``reference``."""
    from lp_deploy.exporters.onnx import validation_ids

    ids, text = validation_ids(tokenizer, cfg.text, cfg.windows * cfg.seqlen)
    windows = ids.reshape(cfg.windows, cfg.seqlen)
    ref_ppl, ppl, agreement = compare_on_text(
        ort_logits_fn(reference), ort_logits_fn(quantized), windows
    )
    max_inc, min_agree = cfg.limits()
    report = QuantValidation(
        text=text,
        windows=len(windows),
        seqlen=cfg.seqlen,
        fp32_perplexity=ref_ppl,
        perplexity=ppl,
        perplexity_increase=ppl / ref_ppl - 1,
        token_agreement=agreement,
        max_perplexity_increase=max_inc,
        min_token_agreement=min_agree,
    )
    report.passed = report.perplexity_increase <= max_inc and agreement >= min_agree
    return report


def _raise_failed(v: QuantValidation, cfg: QuantizeConfig) -> None:
    raise VerificationError(
        f"the {cfg.mode} graph is not accurate enough: perplexity {v.fp32_perplexity:.3f} -> "
        f"{v.perplexity:.3f} ({100 * v.perplexity_increase:+.1f}%, limit "
        f"{100 * v.max_perplexity_increase:+.1f}%), greedy-token agreement "
        f"{100 * v.token_agreement:.1f}% (limit {100 * v.min_token_agreement:.1f}%) on "
        f"{v.windows} x {v.seqlen} tokens of {v.text}. Keep sensitive weights out "
        "(--auto-exclude N [--scan-by kind] [--fallback int8], --exclude lm_head), use "
        "block-wise int8 (--quantize int8), for int4 start from an unrotated model (lp-deploy "
        "fold --no-rotate: the rotation costs weight-only int4 accuracy), or raise "
        "--max-ppl-increase / lower --min-agreement. Nothing was written."
    )


# --------------------------------------------------------------------------- sensitivity


def weight_group(module: str, unit: str = "layer") -> str:
    """The scan's group of a weight. ``layer``: one decoder layer's projections
    (``model.layers.3``) or a module outside the layers (``lm_head``); ``kind``: one projection
    across all layers (``q_proj``, ``down_proj``, ``lm_head``)."""
    if unit == "kind":
        return module.rsplit(".", 1)[-1]
    parts = module.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return ".".join(parts[: i + 2])
    return module


def scan_ids(
    tokenizer: PreTrainedTokenizerBase, cfg: QuantizeConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The scan's windows: the ``cfg.scan_windows`` windows of the validation text right after
    the validation windows (the exclusions are not tuned on the text that decides pass/fail),
    and a record of them; an error when the text is too short to hold both."""
    from lp_deploy.exporters.onnx import validation_ids

    start = cfg.windows * cfg.seqlen
    need = start + cfg.scan_windows * cfg.seqlen
    ids, name = validation_ids(tokenizer, cfg.text, need, repeat=False)
    if ids.numel() < need:
        raise LpDeployError(
            f"--auto-exclude scans {cfg.scan_windows} windows of {cfg.seqlen} tokens after the "
            f"{cfg.windows} validation windows: {need} tokens in all, but {name} has "
            f"{ids.numel()}; give a longer --text or fewer --quant-windows"
        )
    record = {"text": name, "windows": cfg.scan_windows, "seqlen": cfg.seqlen}
    return ids[start:].reshape(cfg.scan_windows, cfg.seqlen), {**record, "first_token": start}


def scan_groups(weights: dict[str, str], skip: set[str], unit: str) -> list[str]:
    """The scan's groups: those with a weight not already kept out."""
    return sorted({weight_group(m, unit) for n, m in weights.items() if n not in skip})


def sensitivity_scan(
    src: Path, cfg: QuantizeConfig, windows: torch.Tensor, skip: set[str]
) -> dict[str, float]:
    """Relative perplexity increase when only one group is quantized, for every group, over
    ``windows`` (:func:`scan_ids`); ``skip``: nodes kept out of the scan (fp32 in it)."""
    from tqdm.auto import tqdm

    weights = matmul_weights(_load(src))
    groups = scan_groups(weights, skip, cfg.scan_by)
    base = perplexity_of(ort_logits_fn(src), windows, progress=False)
    work = src.parent / ".scan"
    work.mkdir(exist_ok=True)
    result: dict[str, float] = {}
    try:
        for group in tqdm(groups, desc=f"sensitivity scan ({cfg.mode})", disable=None):
            others = [
                n for n, m in weights.items() if weight_group(m, cfg.scan_by) != group or n in skip
            ]
            quantize_file(src, work / ONNX_FILE, cfg, sorted(others))
            ppl = perplexity_of(ort_logits_fn(work / ONNX_FILE), windows, progress=False)
            result[group] = ppl / base - 1
            log.info("sensitivity %s: %+.2f%%", group, 100 * result[group])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(sorted(result.items(), key=lambda kv: -kv[1]))


def most_sensitive(sensitivity: dict[str, float], n: int) -> list[str]:
    """The ``n`` groups whose quantization costs the most perplexity."""
    return sorted(sensitivity, key=lambda g: -sensitivity[g])[:n]


# --------------------------------------------------------------------------- entry point


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob(f"{ONNX_FILE}*"))


def _move_graph(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(exist_ok=True)
    for name in (ONNX_FILE, ONNX_DATA_FILE):
        if (src_dir / name).exists():
            os.replace(src_dir / name, dst_dir / name)


def quantize_export(
    tmp: Path, cfg: QuantizeConfig, tokenizer: PreTrainedTokenizerBase, validate: bool = True
) -> QuantReport:
    """Replace the fp32 graph in the export directory ``tmp`` by its quantized version,
    validated against it; raises :class:`VerificationError` past the limits."""
    ref_dir = tmp / REFERENCE_DIR
    _move_graph(tmp, ref_dir)
    try:
        return _quantize_and_check(ref_dir, tmp, cfg, tokenizer, validate)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)


def _check_auto_exclude(cfg: QuantizeConfig, groups: list[str]) -> None:
    if cfg.auto_exclude > len(groups):
        raise LpDeployError(
            f"--auto-exclude {cfg.auto_exclude} is more than the {len(groups)} groups that "
            f"can be quantized ({', '.join(groups)}); choose at most {len(groups)}"
        )


def _quantize_and_check(
    ref_dir: Path,
    tmp: Path,
    cfg: QuantizeConfig,
    tokenizer: PreTrainedTokenizerBase,
    validate: bool,
) -> QuantReport:
    from lp_deploy.exporters.onnx import drop_value_info

    src, dst = ref_dir / ONNX_FILE, tmp / ONNX_FILE
    weights = matmul_weights(_load(src))
    excluded = excluded_nodes(weights, cfg.exclude)
    seconds: dict[str, float] = {}
    sensitivity = None
    scan_data = None
    if cfg.auto_exclude:
        t0 = time.perf_counter()
        _check_auto_exclude(cfg, scan_groups(weights, set(excluded), cfg.scan_by))
        windows, scan_data = scan_ids(tokenizer, cfg)
        sensitivity = sensitivity_scan(src, cfg, windows, set(excluded))
        chosen = set(most_sensitive(sensitivity, cfg.auto_exclude))
        excluded.update(
            {n: m for n, m in weights.items() if weight_group(m, cfg.scan_by) in chosen}
        )
        seconds["sensitivity_scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    always = set(excluded_nodes(weights, []))
    if cfg.fallback == "int8":
        int8 = sorted(set(excluded) - always)
        tool = quantize_file(src, dst, cfg, sorted(always), int8)
    else:
        tool = quantize_file(src, dst, cfg, sorted(excluded))
    drop_value_info(dst)  # dynamic int8 re-infers them; an older fp32 export may carry them
    seconds["quantize"] = time.perf_counter() - t0
    report = QuantReport(
        mode=cfg.mode,
        method="block" if cfg.blockwise else "dynamic",
        bits=cfg.bits,
        tool=tool,
        block_size=cfg.block_size if cfg.blockwise else None,
        accuracy_level=cfg.level,
        per_channel=None if cfg.blockwise else cfg.per_channel,
        quantized=count_quantized(dst),
        excluded=sorted(set(excluded.values())),
        fallback=cfg.fallback,
        fp32_bytes=_bytes(ref_dir),
        onnx_bytes=_bytes(tmp),
        sensitivity=sensitivity,
        scan_data=scan_data,
    )
    if validate:
        t0 = time.perf_counter()
        report.validation = validate_quantized(src, dst, tokenizer, cfg)
        seconds["validate"] = time.perf_counter() - t0
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    v = report.validation
    if v is not None:
        log.info(
            "%s: perplexity %.3f -> %.3f (%+.1f%%), agreement %.1f%%",
            cfg.mode,
            v.fp32_perplexity,
            v.perplexity,
            100 * v.perplexity_increase,
            100 * v.token_agreement,
        )
        if not v.passed:
            _raise_failed(v, cfg)
    return report


__all__ = [
    "ACCURACY_LEVELS",
    "BLOCK_SIZES",
    "DEFAULT_ACCURACY_LEVEL",
    "DEFAULT_LIMITS",
    "FALLBACKS",
    "INT8_METHODS",
    "QUANT_MODES",
    "SCAN_UNITS",
    "QuantReport",
    "QuantValidation",
    "QuantizeConfig",
    "compare_on_text",
    "excluded_nodes",
    "matmul_weights",
    "quantize_export",
    "quantize_file",
    "untie_transposed",
    "validate_quantized",
]
