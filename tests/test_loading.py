"""Model sources, adapters, local loading and the Hadamard-size guard of the pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from lp_deploy.adapters import get_adapter, supported_model_types
from lp_deploy.aliases import ALIASES, DEFAULT_MODEL
from lp_deploy.artifacts import Kind, inspect_artifact
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.errors import ModelSourceError, UnsupportedArchitectureError
from lp_deploy.hadamard import UnsupportedHadamardSize, is_supported
from lp_deploy.loading import load_model
from lp_deploy.modules import ScalePatch
from lp_deploy.pipeline import PatchConfig, run_patch
from lp_deploy.prune import installed_patches


def resolve_source(source: str) -> tuple[str, object]:
    artifact = inspect_artifact(source)
    return artifact.kind.value, artifact.location


# --------------------------------------------------------------------------- inspect_artifact


def test_alias() -> None:
    assert DEFAULT_MODEL in ALIASES
    assert resolve_source("smollm2-135m") == ("alias", "smollm2-135m")


def test_model_dir(tiny_model_dir: Path) -> None:
    assert resolve_source(str(tiny_model_dir)) == ("model", tiny_model_dir)


def test_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == ("gguf", gguf)


def test_home_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source("~/m.gguf") == ("gguf", tmp_path / "m.gguf")


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B"])
def test_hub_id(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    assert resolve_source(hub_id) == ("hub", hub_id)


@pytest.mark.parametrize(
    "source",
    ["./missing", "/definitely/not/here", "missing.gguf", "weights.safetensors", "a/b/c", "nope"],
)
def test_missing_sources(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=rf"model '{source}' not found.*hub id.*alias"):
        resolve_source(source)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"directory without config\.json"):
        resolve_source(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelSourceError, match=r"is a file but not a \.gguf model"):
        resolve_source(str(weights))


def test_model_source_error_is_a_file_not_found_error() -> None:
    with pytest.raises(FileNotFoundError):
        resolve_source("/nowhere/at/all")


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize(
    "model",
    [
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)),
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                word_embed_proj_dim=32,
            )
        ),
    ],
    ids=["gpt2", "opt"],
)
def test_unsupported_architecture(model: Callable[[], torch.nn.Module]) -> None:
    m = model()
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(m)  # type: ignore[arg-type]
    msg = str(info.value)
    assert repr(m.config.model_type) in msg
    assert ", ".join(supported_model_types()) in msg
    assert "lp_deploy/adapters/" in msg
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "granite"} <= set(supported_model_types())


def test_adapters_of_supported_architectures(tiny_model: Callable[..., torch.nn.Module]) -> None:
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        for tied in (False, True):
            model = tiny_model(arch, tied, num_layers=3)
            adapter = get_adapter(model)  # type: ignore[arg-type]
            assert type(adapter).model_types == (arch,)
            assert len(adapter.layers) == 3 and adapter.hidden_size == 64
            assert adapter.tied_embeddings == tied
            assert adapter.backbone is model.model  # type: ignore[attr-defined]
            layer = adapter.layer_adapter(adapter.layers[1])
            assert [p.in_features for p in layer.attn_inputs] == [64, 64, 64]
            assert layer.attn_output.out_features == layer.mlp_output.out_features == 64
            assert (layer.attn_inputs[0].bias is not None) == (arch == "qwen2")


def test_pipeline_rejects_an_unsupported_architecture(tmp_path: Path, tokenizer: object) -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        run_patch(
            PatchConfig(
                model=str(tmp_path / "gpt2"),
                prune=1,
                calibration=CalibrationSpec("missing.txt"),
                progress=False,
            )
        )


# --------------------------------------------------------------------------- load_model


def test_load_local_dir(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    assert loaded.source["kind"] == Kind.MODEL.value
    assert loaded.source["source"] == str(tiny_model_dir)
    digest = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.source["sha256"] == {"model.safetensors": digest}
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.model.config.num_hidden_layers == 8
    ids = loaded.tokenizer("the city , river .", add_special_tokens=False)["input_ids"]
    assert ids == [4, 61, 126, 64, 127]
    with torch.no_grad():
        assert loaded.model(torch.tensor([ids])).logits.shape == (1, 5, 128)


def test_load_local_dir_in_float64(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), dtype=torch.float64)
    assert next(loaded.model.parameters()).dtype == torch.float64


def test_load_dir_without_weights(save_tiny_model: Callable[..., Path]) -> None:
    path = save_tiny_model(num_layers=2)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="cannot load model"):
        load_model(str(path))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_load_dir_without_tokenizer(save_tiny_model: Callable[..., Path], arch: str) -> None:
    path = save_tiny_model(arch=arch, num_layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(ModelSourceError, match="has no tokenizer"):
        load_model(str(path))


# --------------------------------------------------------------------------- Hadamard size


HIDDEN = 50  # 5 heads of 10; 50 = 2 * 25 has no Hadamard matrix


def test_unsupported_hidden_size_with_rotate(
    save_tiny_model: Callable[..., Path], text_file: Path
) -> None:
    assert not is_supported(HIDDEN)
    path = save_tiny_model(num_layers=4, hidden=HIDDEN, heads=5, kv_heads=1)
    spec = CalibrationSpec(str(text_file), samples=2, seqlen=16)
    cfg = PatchConfig(model=str(path), prune=1, patch="rotate", calibration=spec)
    cfg.progress = False
    with pytest.raises(UnsupportedHadamardSize, match=r"d=50.*--patch diag") as info:
        run_patch(cfg)
    assert info.value.size == HIDDEN

    # The check comes before calibration: a missing calibration file is not reached.
    cfg.calibration = dataclasses.replace(spec, data=str(text_file.parent / "missing.txt"))
    with pytest.raises(UnsupportedHadamardSize):
        run_patch(cfg)

    # --patch diag works on the same model.
    cfg.calibration, cfg.patch = spec, "diag"
    result = run_patch(cfg)
    assert result.stats is not None and result.stats.abs_rot_sum is None
    assert len(result.plan.removed) == 1
    patches = installed_patches(result.model.adapter)
    assert len(patches) == 1 and all(isinstance(p, ScalePatch) for p in patches.values())
