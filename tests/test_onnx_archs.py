"""The ONNX round trip on every supported architecture: patch -> export -> validate -> greedy.

A tiny random model of each family (with non-trivial norms, Qwen2's q/k/v biases and Qwen3's
per-head q/k norms) is saved, pruned and patched by the ``patch`` stage, exported, validated
in ONNX Runtime against PyTorch by the exporter itself, and then generates the same greedy
tokens in both runtimes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ARCHS
from onnx import numpy_helper

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
from lp_deploy.loading import load_model
from lp_deploy.pipeline import PatchConfig, run_patch
from lp_deploy.runtimes import create_runtime

GREEDY_TOKENS = 32
PROMPT = "the city of the river was built"


def _initializers(export: Path) -> list[np.ndarray]:
    graph = onnx.load(str(export / "model.onnx")).graph
    return [numpy_helper.to_array(i) for i in graph.initializer]


def _stored(tensor: np.ndarray, inits: list[np.ndarray]) -> bool:
    return any(i.shape == tensor.shape and np.allclose(i, tensor) for i in inits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patch_export_validate_generate(
    arch: str, save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    source = save_tiny_model(f"{arch}-dense", arch=arch, num_layers=6, sliding=False)
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

    # What makes the family different reached the graph.
    layer = load_model(patched).adapter.layers[0]
    inits = _initializers(export)
    attn = layer.self_attn
    if arch == "qwen2":
        assert _stored(attn.q_proj.bias.detach().numpy(), inits)
    if arch == "qwen3":
        assert _stored(attn.q_norm.weight.detach().numpy(), inits)
