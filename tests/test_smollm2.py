"""The real SmolLM2-135M: 5 of 30 layers pruned by cosine selection, rotate patch.

Slow (one to two minutes on a CPU core); run with ``pytest -m slow``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lp_deploy.adapters import get_adapter
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import load_patched, without_patches
from lp_deploy.hadamard import is_supported
from lp_deploy.modules import LinearPatch
from lp_deploy.perplexity import eval_windows, model_perplexity
from lp_deploy.pipeline import PatchConfig, PatchResult, run_patch
from lp_deploy.prune import installed_patches

pytestmark = pytest.mark.slow

PRUNE = 5
GEN_TOKENS = 32


@pytest.fixture(scope="module")
def patched(
    smollm2: Any, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PatchResult, Path]:
    """run_patch on SmolLM2-135M: calibration 8 x 256 tokens of valid.txt (seed 0), the
    checkpoint written to a temp dir."""
    out = tmp_path_factory.mktemp("smollm2") / "patched"
    cfg = PatchConfig(
        model="smollm2-135m",
        prune=PRUNE,
        select="cosine",
        patch="rotate",
        calibration=CalibrationSpec(str(data_dir / "wikitext-2" / "valid.txt"), 8, 256, 0),
        out=out,
        progress=False,
    )
    return run_patch(cfg), out


def test_the_model(smollm2: Any) -> None:
    config = smollm2.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert config.hidden_size == 576 and is_supported(576)
    assert smollm2.source["kind"] == "alias"
    assert set(smollm2.source["sha256"]) == {"SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert get_adapter(smollm2.model).tied_embeddings


def test_rotate_patch_lowers_perplexity(patched: tuple[PatchResult, Path], data_dir: Path) -> None:
    result, _ = patched
    plan, summary = result.plan, result.summary
    assert plan.num_layers == 30 and len(plan.removed) == PRUNE and len(plan.gaps) == 1
    gap = plan.gaps[0]
    assert gap.size == PRUNE and plan.method == "cosine"
    assert result.stats is not None and result.stats.n_tokens == 8 * 256
    candidates = plan.scores["candidates"]
    assert plan.scores["similarity"] == max(candidates) == candidates[gap.start]

    # Perplexity on the first 8 windows of 512 tokens of test.txt (the dense model is not
    # evaluated here: that would cost another third of the time).
    model = result.model.model
    windows = eval_windows(result.model.tokenizer, data_dir / "wikitext-2" / "test.txt", 512, 8)
    assert windows.shape == (8, 512)
    with without_patches(result.model.adapter):
        pruned = model_perplexity(model, windows, progress=False)
    rotate = model_perplexity(model, windows, progress=False)
    print(
        f"\nSmolLM2-135M, layers {gap.start}-{gap.end - 1} removed: perplexity {pruned:.2f} "
        f"unpatched -> {rotate:.2f} with the rotate patch"
    )
    assert rotate < pruned, (rotate, pruned)
    assert rotate < 100  # still a working language model
    assert summary["perplexity"] == {}

    patches = installed_patches(result.model.adapter)
    assert list(patches) == [plan.patch_position(gap)]
    assert isinstance(patches[gap.start], LinearPatch)


def test_save_load_gives_identical_logits(patched: tuple[PatchResult, Path], smollm2: Any) -> None:
    result, out = patched
    assert (out / "summary.json").is_file()
    loaded = load_patched(out)
    assert loaded.model.config.num_hidden_layers == 30 - PRUNE
    assert sorted(installed_patches(loaded.adapter)) == sorted(
        installed_patches(result.model.adapter)
    )
    text = "The tower is 324 metres tall , about the same height as an 81 @-@ storey building ."
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    assert loaded.tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        before = result.model.model(ids, use_cache=False).logits
        after = loaded.model(ids, use_cache=False).logits
    assert (after - before).abs().max() <= 1e-6


def test_generation_with_cache_equals_without(patched: tuple[PatchResult, Path]) -> None:
    result, _ = patched
    model, tokenizer = result.model.model, result.model.tokenizer
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    runs = []
    for use_cache in (True, False):
        with torch.no_grad():
            runs.append(
                model.generate(
                    prompt,
                    max_new_tokens=GEN_TOKENS,
                    min_new_tokens=GEN_TOKENS,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=tokenizer.eos_token_id,
                )
            )
    assert runs[0].shape == (1, prompt.shape[1] + GEN_TOKENS)
    assert torch.equal(runs[0], runs[1])
