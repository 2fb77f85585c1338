"""Prune + patch every architecture, then generate, save, reload and reject corrupt checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GEMMAS
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from lp_deploy.adapters import get_adapter
from lp_deploy.artifacts import META_KEY, WEIGHTS_FILE
from lp_deploy.calibration import sample_windows
from lp_deploy.checkpoint import (
    PATCH_PREFIX,
    CheckpointError,
    load_patched,
    save_patched,
    without_patches,
)
from lp_deploy.errors import OutputExistsError
from lp_deploy.fit import fit_patches
from lp_deploy.model import LoadedModel
from lp_deploy.modules import LinearPatch, PatchedInput, ScalePatch, unwrap
from lp_deploy.prune import apply_plan, installed_patches
from lp_deploy.selection import Gap, PruningPlan, make_plan
from lp_deploy.stats import collect_stats

LAYERS = 8
PLANS = {
    "middle": [3, 4],
    "first": [0, 1, 2],
    "last": [6, 7],
    "two": [1, 2, 5],
}
GEN_TOKENS = 16
Factory = Callable[..., PreTrainedModel]


def _kind(plan_name: str, tied: bool) -> str:
    """Alternate rotate / diag so every architecture sees both kinds on every plan shape."""
    return "rotate" if (list(PLANS).index(plan_name) + tied) % 2 == 0 else "diag"


def _patched(
    factory: Factory, calib_ids: torch.Tensor, arch: str, tied: bool, removed: list[int], kind: str
) -> tuple[PreTrainedModel, PruningPlan, dict[Gap, Any]]:
    model = factory(arch, tied, num_layers=LAYERS)
    adapter = get_adapter(model)
    stats = collect_stats(adapter, sample_windows(calib_ids, 4, 32, seed=0), progress=False)
    plan = make_plan(LAYERS, removed, "manual")
    patches = fit_patches(stats, plan, kind)
    apply_plan(adapter, plan, patches)
    return model, plan, patches


def _ids(calib_ids: torch.Tensor, n: int = 2, length: int = 20) -> torch.Tensor:
    return sample_windows(calib_ids, n, length, seed=7)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def _generate(
    model: PreTrainedModel, prompt: torch.Tensor, use_cache: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (batch, prompt + 16) and the raw logits of every step (16, batch, vocab)."""
    out = model.generate(
        prompt,
        max_new_tokens=GEN_TOKENS,
        min_new_tokens=GEN_TOKENS,  # no early stop at eos: always 16 tokens
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=model.config.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert out.sequences.shape == (prompt.shape[0], prompt.shape[1] + GEN_TOKENS)
    return out.sequences, torch.stack(out.logits)


def _greedy(model: PreTrainedModel, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return _generate(model, prompt, use_cache)[0]


class _Skip(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _reference(factory: Factory, arch: str, tied: bool, plan: PruningPlan, patches: Any) -> Any:
    """The dense model with deleted layers skipped and each patch applied (by a pre-hook) to
    the input of the first kept layer after its gap, in the original numbering."""
    ref = factory(arch, tied, num_layers=LAYERS)  # same seed: same weights
    layers = ref.model.layers
    for i in plan.removed:
        layers[i] = _Skip()
    for gap, patch in patches.items():
        target = layers[gap.end] if gap.end < LAYERS else ref.model.norm
        if isinstance(patch, LinearPatch):
            w = patch.weight.detach().clone()
            fn = lambda x, w=w: x @ w  # noqa: E731
        else:
            s = patch.scale.detach().clone()
            fn = lambda x, s=s: x * s  # noqa: E731
        target.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:]))
    return ref


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_pruned_model_matches_the_dense_model_with_layers_skipped(
    tiny_model: Factory, calib_ids: torch.Tensor, arch: str, tied: bool, plan_name: str
) -> None:
    kind = _kind(plan_name, tied)
    model, plan, patches = _patched(tiny_model, calib_ids, arch, tied, PLANS[plan_name], kind)
    ids = _ids(calib_ids)
    got = _logits(model, ids)
    ref = _logits(_reference(tiny_model, arch, tied, plan, patches), ids)
    assert (got - ref).abs().max() <= 1e-5

    # The patches matter: without them the logits move.
    with without_patches(get_adapter(model)):
        unpatched = _logits(model, ids)
    assert (unpatched - got).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, ids), got, rtol=0, atol=0)  # restored

    # Each patch sits in front of the first kept layer after its gap (or the final norm).
    adapter = get_adapter(model)
    found = installed_patches(adapter)
    assert found == {plan.patch_position(g): p for g, p in patches.items()}
    assert all(
        isinstance(p, LinearPatch if kind == "rotate" else ScalePatch) for p in found.values()
    )
    expected_positions = {"middle": {3}, "first": {0}, "last": {6}, "two": {1, 3}}[plan_name]
    assert set(found) == expected_positions
    assert isinstance(adapter.final_norm, PatchedInput) == (plan_name == "last")


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_layer_indices_and_types_after_pruning(
    tiny_model: Factory, calib_ids: torch.Tensor, arch: str, plan_name: str
) -> None:
    original_types = getattr(tiny_model(arch, num_layers=LAYERS).config, "layer_types", None)
    model, plan, _ = _patched(tiny_model, calib_ids, arch, False, PLANS[plan_name], "rotate")
    adapter = get_adapter(model)
    new_count = LAYERS - len(PLANS[plan_name])
    assert len(adapter.layers) == model.config.num_hidden_layers == new_count == len(plan.kept)
    assert [unwrap(layer).self_attn.layer_idx for layer in adapter.layers] == list(range(new_count))
    if arch in ("qwen2", "qwen3", *GEMMAS):
        assert original_types is not None and len(set(original_types)) == 2
        assert model.config.layer_types == [original_types[i] for i in plan.kept]
        for layer, kind in zip(adapter.layers, model.config.layer_types, strict=True):
            attn = unwrap(layer).self_attn
            assert attn.layer_type == kind
            assert (attn.sliding_window is not None) == (kind == "sliding_attention")
    else:
        types = getattr(model.config, "layer_types", None)
        assert types is None or set(types) == {"full_attention"}


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_generation_with_cache_equals_without(
    tiny_model: Factory, calib_ids: torch.Tensor, arch: str, tied: bool, plan_name: str
) -> None:
    kind = _kind(plan_name, tied)
    model, _, _ = _patched(tiny_model, calib_ids, arch, tied, PLANS[plan_name], kind)
    prompt = _ids(calib_ids, n=2, length=12)
    tokens, logits = _generate(model, prompt, use_cache=True)
    tokens_nc, logits_nc = _generate(model, prompt, use_cache=False)
    assert torch.equal(tokens, tokens_nc)
    assert logits.shape == (GEN_TOKENS, 2, model.config.vocab_size)
    # Step-by-step logits agree too (a stronger check than the argmax when a random model
    # repeats one token); the sequences pass the sliding window (8) of mistral / qwen.
    assert (logits - logits_nc).abs().max() <= 1e-4 * logits_nc.abs().max()


# --------------------------------------------------------------------------- save / load


def _save(
    model: PreTrainedModel,
    tokenizer: Any,
    plan: PruningPlan,
    out: Path,
    kind: str,
    overwrite: bool = False,
) -> Path:
    meta = {"plan": plan.to_dict(), "patch": {"kind": kind}}
    loaded = LoadedModel(model, tokenizer, meta)
    return save_patched(loaded, out, extra={"note.json": {"hello": 1}}, overwrite=overwrite)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_save_load_round_trip(
    tiny_model: Factory,
    calib_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    arch: str,
    tied: bool,
    plan_name: str,
) -> None:
    kind = _kind(plan_name, tied)
    model, plan, _ = _patched(tiny_model, calib_ids, arch, tied, PLANS[plan_name], kind)
    ids = _ids(calib_ids)
    before = _logits(model, ids)
    positions = sorted(installed_patches(get_adapter(model)))
    out = _save(model, tokenizer, plan, tmp_path / "ckpts" / "patched", kind)
    tokenizer.save_pretrained(tmp_path / "tok")

    # Saving leaves the in-memory model as it was.
    assert sorted(installed_patches(get_adapter(model))) == positions
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)

    # (c) layout
    assert [p.name for p in out.parent.iterdir()] == ["patched"]  # no temp / old dirs left
    names = {p.name for p in out.iterdir()}
    assert {"config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((out / "note.json").read_text()) == {"hello": 1}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(plan.kept)
    section = cfg[META_KEY]
    assert PruningPlan.from_dict(section["plan"]) == plan
    assert section["patch"] == {"kind": kind}
    assert [r["position"] for r in section["patches"]] == positions
    assert "toolkit_version" in section
    if arch in ("qwen2", "qwen3"):
        assert len(cfg["layer_types"]) == len(plan.kept)
    with safe_open(str(out / WEIGHTS_FILE), "pt") as fh:
        keys = set(fh.keys())
    assert {k for k in keys if k.startswith(PATCH_PREFIX)} == {r["key"] for r in section["patches"]}
    assert ("lm_head.weight" in keys) == (not tied)
    assert not any("inner" in k or ".patch." in k.removeprefix(PATCH_PREFIX) for k in keys)

    # (b) reload: same logits, same patches
    loaded = load_patched(out)
    assert loaded.meta["plan"] == plan.to_dict()
    adapter = loaded.adapter
    assert len(adapter.layers) == loaded.model.config.num_hidden_layers == len(plan.kept)
    assert [unwrap(layer).self_attn.layer_idx for layer in adapter.layers] == list(
        range(len(plan.kept))
    )
    assert adapter.tied_embeddings == tied
    got = installed_patches(adapter)
    want = installed_patches(get_adapter(model))
    assert sorted(got) == positions
    for pos in positions:
        assert type(got[pos]) is type(want[pos])
        for a, b in zip(got[pos].parameters(), want[pos].parameters(), strict=True):
            assert torch.equal(a, b)
    after = _logits(loaded.model, ids)
    assert (after - before).abs().max() <= 1e-6
    prompt = _ids(calib_ids, n=1, length=10)
    assert torch.equal(_greedy(loaded.model, prompt, True), _greedy(model, prompt, True))
    assert (out / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    if arch != "qwen2":  # transformers forces its Qwen2Tokenizer class on model_type qwen2
        text = "the city , river ."
        encode = lambda tok: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert encode(loaded.tokenizer) == encode(tokenizer) == [4, 61, 126, 64, 127]


def test_unpatched_pruned_model_round_trips(
    tiny_model: Factory, calib_ids: torch.Tensor, tokenizer: Any, tmp_path: Path
) -> None:
    model, plan, _ = _patched(tiny_model, calib_ids, "llama", False, [2, 3], "none")
    assert installed_patches(get_adapter(model)) == {}
    loaded = load_patched(_save(model, tokenizer, plan, tmp_path / "out", "none"))
    assert installed_patches(loaded.adapter) == {}
    assert loaded.meta["patches"] == []
    ids = _ids(calib_ids)
    assert (_logits(loaded.model, ids) - _logits(model, ids)).abs().max() <= 1e-6


def test_saving_over_an_existing_checkpoint_replaces_it(
    tiny_model: Factory, calib_ids: torch.Tensor, tokenizer: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, plan1, _ = _patched(tiny_model, calib_ids, "qwen3", False, [3, 4], "rotate")
    _save(first, tokenizer, plan1, out, "rotate")
    second, plan2, _ = _patched(tiny_model, calib_ids, "qwen3", False, [0, 6, 7], "diag")
    _save(second, tokenizer, plan2, out, "diag")  # an earlier checkpoint: replaced
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    ids = _ids(calib_ids)
    assert load_patched(out).meta["plan"]["removed"] == [0, 6, 7]

    # A file lp-deploy did not write: refused, and with overwrite kept beside the new files.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"notes\.txt.*--overwrite"):
        _save(first, tokenizer, plan1, out, "rotate")
    assert load_patched(out).meta["plan"]["removed"] == [0, 6, 7]
    _save(first, tokenizer, plan1, out, "rotate", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    loaded = load_patched(out)
    assert loaded.meta["plan"]["removed"] == [3, 4]
    assert (_logits(loaded.model, ids) - _logits(first, ids)).abs().max() <= 1e-6


def test_failed_save_leaves_nothing_behind(
    tiny_model: Factory, calib_ids: torch.Tensor, tokenizer: Any, tmp_path: Path
) -> None:
    model, plan, _ = _patched(tiny_model, calib_ids, "llama", True, [3, 4], "rotate")

    class BrokenTokenizer:
        def save_pretrained(self, *_args: Any, **_kwargs: Any) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save(model, BrokenTokenizer(), plan, tmp_path / "out", "rotate")
    assert list(tmp_path.iterdir()) == []

    # An existing checkpoint survives a failed overwrite.
    out = _save(model, tokenizer, plan, tmp_path / "out", "rotate")
    with pytest.raises(OSError, match="disk full"):
        _save(model, BrokenTokenizer(), plan, out, "rotate")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    load_patched(out)


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture
def checkpoint(
    tiny_model: Factory, calib_ids: torch.Tensor, tokenizer: Any, tmp_path: Path
) -> Path:
    """A good checkpoint: llama, layers 2, 3 and 7 removed, rotate patches at 2 and 5."""
    model, plan, _ = _patched(tiny_model, calib_ids, "llama", False, [2, 3, 7], "rotate")
    out = _save(model, tokenizer, plan, tmp_path / "good", "rotate")
    load_patched(out)  # sanity: it loads before we break it
    return out


def _edit_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_patched(path)
    return str(info.value)


@pytest.mark.parametrize("keep", [100, -1000])
def test_truncated_weights(checkpoint: Path, keep: int) -> None:
    weights = checkpoint / WEIGHTS_FILE
    os.truncate(weights, keep if keep > 0 else weights.stat().st_size + keep)
    msg = _load_error(checkpoint)
    assert "corrupt or truncated" in msg and WEIGHTS_FILE in msg


def test_missing_weights(checkpoint: Path) -> None:
    (checkpoint / WEIGHTS_FILE).unlink()
    assert "is missing" in _load_error(checkpoint)


def test_plain_model_dir_is_not_a_checkpoint(tiny_model_dir: Path) -> None:
    msg = _load_error(tiny_model_dir)
    assert "no 'lp_deploy' section" in msg and "plain model" in msg and "lp-deploy patch" in msg


def test_layer_count_inconsistent_with_the_plan(checkpoint: Path) -> None:
    _edit_config(checkpoint, lambda c: c.update(num_hidden_layers=7))
    msg = _load_error(checkpoint)
    assert "num_hidden_layers=7" in msg and "leaves 5 layers" in msg


def test_missing_patch_tensor(checkpoint: Path) -> None:
    weights = checkpoint / WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = f"{PATCH_PREFIX}5.weight"
    assert key in tensors
    del tensors[key]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    msg = _load_error(checkpoint)
    assert "lacks patch tensor" in msg and key in msg


def test_missing_layer_tensor(checkpoint: Path) -> None:
    weights = checkpoint / WEIGHTS_FILE
    tensors = load_file(str(weights))
    del tensors["model.layers.4.mlp.down_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    msg = _load_error(checkpoint)
    assert "does not match its config.json" in msg and "model.layers.4.mlp.down_proj" in msg


def test_missing_directory(tmp_path: Path) -> None:
    msg = _load_error(tmp_path / "nowhere")
    assert "not a patched checkpoint" in msg and "nowhere" in msg


def test_invalid_config_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text('{"num_hidden_layers": 5,')
    assert "not valid JSON" in _load_error(checkpoint)


def test_patch_position_beyond_the_layers(checkpoint: Path) -> None:
    def move(cfg: dict[str, Any]) -> None:
        cfg[META_KEY]["patches"][-1]["position"] = 9

    _edit_config(checkpoint, move)
    assert "beyond the 5 layers" in _load_error(checkpoint)


def test_missing_tokenizer(checkpoint: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    assert "tokenizer" in _load_error(checkpoint)
