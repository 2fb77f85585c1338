"""The ONNX round trip on every supported architecture: patch -> export -> validate -> greedy.

A tiny random model of each family (with non-trivial norms, Qwen2's q/k/v biases, Qwen3's
per-head q/k norms, Granite's multipliers, Gemma's soft-capping, Qwen3-MoE's experts) is
saved, pruned and patched by the ``patch`` stage, exported, validated in ONNX Runtime
against PyTorch by the exporter itself, and then generates the same greedy tokens in both
runtimes.

Families with sliding-window attention (Mistral on every layer, Qwen2/Qwen3 on the upper
half, Gemma 2/3 on their local layers) use a 16-token window, and on a 64-token prompt the
export is also checked against transformers' own forward pass and ``generate`` (its cropped
sliding-window cache and masks): the export keeps the whole past on every layer and applies
the window in the attention mask. A model without the window must differ on that prompt, so
the window is exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import ARCHS, PAD_ID
from onnx import numpy_helper

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
from lp_deploy.loading import load_model
from lp_deploy.pipeline import PatchConfig, run_patch
from lp_deploy.runtimes import create_runtime

GREEDY_TOKENS = 32
PROMPT = "the city of the river was built"
WINDOW, LONG_PROMPT, LONG_NEW = 16, 64, 16
TOL = 1e-3  # max |logit diff| vs transformers, fp32 (measured 1e-5 - 5e-5)


def _initializers(export: Path) -> list[np.ndarray]:
    graph = onnx.load(str(export / "model.onnx")).graph
    return [numpy_helper.to_array(i) for i in graph.initializer]


def _stored(tensor: np.ndarray, inits: list[np.ndarray]) -> bool:
    return any(i.shape == tensor.shape and np.allclose(i, tensor) for i in inits)


def _is_sliding(model: Any) -> bool:
    window = getattr(model.config, "sliding_window", None)
    types = getattr(model.config, "layer_types", None)
    return window is not None and (types is None or "sliding_attention" in types)


def check_against_transformers(ort: Any, model: Any) -> None:
    """64-token prompt: ORT logits and greedy tokens equal transformers' own sliding-window
    forward and generate; without the window the logits differ."""
    assert model.config.sliding_window == WINDOW
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, int(model.config.vocab_size), (1, LONG_PROMPT), generator=gen)
    got, _ = ort.forward(ids, torch.ones_like(ids), torch.arange(LONG_PROMPT)[None], None)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        model.config.sliding_window = 10 * LONG_PROMPT
        unwindowed = model(input_ids=ids, use_cache=False).logits
        model.config.sliding_window = WINDOW
        ref = model.generate(ids, max_new_tokens=LONG_NEW, do_sample=False, pad_token_id=PAD_ID)
    assert float((got - want).abs().max()) <= TOL
    assert float((unwindowed - want).abs().max()) > 100 * TOL
    assert (
        ort.generate(ids, max_new_tokens=LONG_NEW, stop_token_ids=[])
        == ref[0, LONG_PROMPT:].tolist()
    )


#: families whose round trip runs under ``make test-all`` only (each export costs a fixed
#: ~15-40 s of dynamo tracing; CI time is bounded); all passed when they were added
HEAVY = ("phi3", "granite", "olmo2", "gemma2", "qwen3_moe")


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.heavy) if a in HEAVY else a for a in ARCHS]
)
def test_patch_export_validate_generate(
    arch: str, save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    source = save_tiny_model(f"{arch}-dense", arch=arch, num_layers=6, window=WINDOW)
    patched = tmp_path / f"{arch}-patched"
    spec = CalibrationSpec(str(text_file), samples=4, seqlen=32)
    cfg = PatchConfig(model=str(source), prune=2, calibration=spec, out=patched, progress=False)
    run_patch(cfg)
    export = export_onnx(OnnxExportConfig(model=str(patched), out=tmp_path / f"{arch}-onnx")).out

    validation = read_report(export)["validation"]
    assert validation["passed"] and validation["prefill_logits"] <= validation["tolerance"]
    ort = create_runtime("onnxruntime", export)
    ref = create_runtime("torch", patched)
    want = ref.generate(PROMPT, max_new_tokens=GREEDY_TOKENS, stop_token_ids=[])
    assert ort.generate(PROMPT, max_new_tokens=GREEDY_TOKENS, stop_token_ids=[]) == want

    model = load_model(patched).model
    if arch in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert _is_sliding(model)
        check_against_transformers(ort, model)
    # What makes the family different reached the graph.
    attn = load_model(patched).adapter.layers[0].self_attn
    inits = _initializers(export)
    if arch == "qwen2":
        assert _stored(attn.q_proj.bias.detach().numpy(), inits)
    if arch == "qwen3":
        assert _stored(attn.q_norm.weight.detach().numpy(), inits)
