"""Sliding-window attention in the ONNX export: a tiny Mistral (every layer local) and a tiny
Gemma 3 (two local layers per global one), window 16, saved and reloaded from disk, exported,
validated by the exporter on a 64-token prefill, then checked against Hugging Face's own
forward pass (its cropped sliding-window cache, its masks) on a 64-token prompt: logits and
greedy tokens. The export keeps the whole past on every layer and applies the window in the
attention mask."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PAD_ID

from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
from lp_deploy.loading import load_model
from lp_deploy.runtimes import create_runtime

WINDOW, PROMPT, NEW = 16, 64, 16
TOL = 1e-3  # max |logit diff|, fp32 (measured ~1e-6 on these models)


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_export_matches_transformers(
    arch: str, save_tiny_model: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    source = save_tiny_model(arch, arch=arch, num_layers=3, window=WINDOW)
    cfg = OnnxExportConfig(
        model=str(source), out=tmp_path / "onnx", prefill_tokens=PROMPT, text=str(text_file)
    )
    export = export_onnx(cfg).out
    validation = read_report(export)["validation"]
    assert validation["passed"] and validation["prefill_tokens"] == PROMPT

    model = load_model(source).model
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * 3
    assert model.config.sliding_window == WINDOW and "sliding_attention" in types
    ids = _prompt(int(model.config.vocab_size))
    ort = create_runtime("onnxruntime", export)
    mask = torch.ones_like(ids)
    got, _ = ort.forward(ids, mask, torch.arange(PROMPT)[None], None)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        model.config.sliding_window = 10 * PROMPT  # the window must matter on this prompt
        unwindowed = model(input_ids=ids, use_cache=False).logits
        model.config.sliding_window = WINDOW
    assert float((got - want).abs().max()) <= TOL
    assert float((unwindowed - want).abs().max()) > 100 * TOL

    with torch.no_grad():  # transformers' generate: its own (cropped) sliding-window cache
        ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD_ID)
    tokens = ort.generate(ids, max_new_tokens=NEW, stop_token_ids=[])
    assert tokens == ref[0, PROMPT:].tolist()
