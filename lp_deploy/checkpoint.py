"""Patched checkpoints: save_pretrained layout + patch tensors + an ``lp_deploy`` config section."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lp_deploy import __version__
from lp_deploy.adapters import ModelAdapter, get_adapter
from lp_deploy.artifacts import CONFIG_FILE, META_KEY, WEIGHTS_FILE, Kind, output_dir, read_json
from lp_deploy.errors import CheckpointError
from lp_deploy.hf_config import save_config
from lp_deploy.model import LoadedModel
from lp_deploy.modules import HadamardInputLinear, LinearPatch, ScalePatch, replace_module
from lp_deploy.prune import installed_patches, set_patch

PATCH_PREFIX = "lp_deploy.patch."


@contextlib.contextmanager
def without_patches(adapter: ModelAdapter) -> Iterator[dict[int, torch.nn.Module]]:
    """Temporarily take the patches out (plain architecture state dict), then put them back."""
    patches = installed_patches(adapter)
    for pos in patches:
        set_patch(adapter, pos, None)
    try:
        yield patches
    finally:
        for pos, patch in patches.items():
            set_patch(adapter, pos, patch)


def _patch_tensor(patch: torch.nn.Module) -> tuple[str, torch.Tensor]:
    if isinstance(patch, LinearPatch):
        return "weight", patch.weight.data
    if isinstance(patch, ScalePatch):
        return "scale", patch.scale.data
    raise CheckpointError(f"cannot save patch of type {type(patch).__name__}")


def _state_and_patches(
    model: PreTrainedModel,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    adapter = get_adapter(model)
    tied = adapter.tied_embeddings
    with without_patches(adapter) as patches:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    records = []
    for pos, patch in sorted(patches.items()):
        name, tensor = _patch_tensor(patch)
        key = f"{PATCH_PREFIX}{pos}.{name}"
        state[key] = tensor.contiguous()
        records.append({"position": pos, "type": name, "key": key})
    return state, records


def save_patched(
    loaded: LoadedModel,
    out: Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``loaded`` (its ``meta`` as the ``lp_deploy`` section) as a checkpoint under the
    ``--out`` rule: built beside ``out`` and renamed into place when complete.

    ``extra`` maps file names to JSON-serialisable data written beside the weights.
    """
    model = loaded.model
    state, records = _state_and_patches(model)
    config = copy.deepcopy(model.config)
    full_meta = {**loaded.meta, "patches": records, "toolkit_version": __version__}
    setattr(config, META_KEY, full_meta)
    with output_dir(out, Kind.CHECKPOINT, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_config(config, tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    loaded.meta = full_meta
    return Path(out)


def read_meta(path: Path) -> dict[str, Any]:
    """The ``lp_deploy`` section of a checkpoint's config.json (validated)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir() or not cfg_file.is_file():
        raise CheckpointError(
            f"{path} is not a patched checkpoint (no config.json); create one with "
            "'lp-deploy patch'"
        )
    cfg = read_json(cfg_file, "checkpoint")
    meta = cfg.get(META_KEY)
    if not isinstance(meta, dict) or not ("plan" in meta or "fold" in meta):
        raise CheckpointError(
            f"{cfg_file} has no '{META_KEY}' section: this is a plain model, not an lp-deploy "
            "checkpoint; create one with 'lp-deploy patch' (or 'lp-deploy fold')"
        )
    if "plan" not in meta:  # a folded (rotated) dense model
        return meta
    expected = meta["plan"]["num_layers"] - len(meta["plan"]["removed"])
    if cfg.get("num_hidden_layers") != expected:
        raise CheckpointError(
            f"{cfg_file}: num_hidden_layers={cfg.get('num_hidden_layers')} but the pruning plan "
            f"leaves {expected} layers; the checkpoint is inconsistent"
        )
    return meta


def _read_patch_tensors(path: Path, records: list[dict[str, Any]]) -> dict[int, torch.nn.Module]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    patches: dict[int, torch.nn.Module] = {}
    try:
        with safe_open(str(weights), "pt") as fh:
            keys = set(fh.keys())
            for rec in records:
                if rec["key"] not in keys:
                    raise CheckpointError(f"{weights} lacks patch tensor {rec['key']!r}")
                t = fh.get_tensor(rec["key"])
                patches[int(rec["position"])] = (
                    LinearPatch(t) if rec["type"] == "weight" else ScalePatch(t)
                )
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}); re-create it") from exc
    return patches


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _load_base(path: Path, dtype: torch.dtype | None) -> PreTrainedModel:
    try:
        with _quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", output_loading_info=True
            )
            model, info = loaded
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load weights from {path}: {exc}") from exc
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(PATCH_PREFIX)]
    problems = {
        "missing": list(info.get("missing_keys", [])),
        "unexpected": unexpected,
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    if any(problems.values()):
        raise CheckpointError(f"{path}/{WEIGHTS_FILE} does not match its config.json: {problems}")
    return model


def install_online_hadamard(model: torch.nn.Module, adapter: ModelAdapter) -> None:
    """Every layer's ``down_proj`` reads ``x H`` (its weight must hold ``W H``)."""
    for layer in adapter.layers:
        lin = adapter.layer_adapter(layer).mlp_output
        if not isinstance(lin, torch.nn.Linear):
            raise CheckpointError(f"online Hadamard on a {type(lin).__name__}: not supported")
        if not isinstance(lin, HadamardInputLinear):
            replace_module(model, lin, HadamardInputLinear(lin))


def load_patched(path: str | Path, dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild a patched model saved by :func:`save_patched` (or the fold stage)."""
    path = Path(path)
    meta = read_meta(path)
    patches = _read_patch_tensors(path, meta.get("patches", []))
    AutoConfig.from_pretrained(path)  # fails early on an unknown model_type
    model = _load_base(path, dtype)
    adapter = get_adapter(model)
    for pos, patch in patches.items():
        if pos > len(adapter.layers):
            raise CheckpointError(
                f"patch position {pos} is beyond the {len(adapter.layers)} layers"
            )
        set_patch(adapter, pos, patch.to(dtype=next(model.parameters()).dtype))
    if (meta.get("fold") or {}).get("online_hadamard"):
        install_online_hadamard(model, adapter)
    model.eval()
    # Without its files AutoTokenizer may silently build an empty tokenizer from model_type.
    if not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer_config.json; the checkpoint is incomplete")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from exc
    source = {"source": str(path), "kind": Kind.CHECKPOINT.value}
    return LoadedModel(model=model, tokenizer=tokenizer, meta=meta, source=source)
