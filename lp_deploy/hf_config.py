"""Model configs every transformers version reads the same way.

transformers 5 stores RoPE settings only as ``rope_parameters`` and the dtype as ``dtype``;
transformers 4.x (which optimum-onnx and many serving converters still run on) reads
``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` and silently falls back to defaults
(``rope_theta`` 10,000) when they are missing. Every ``config.json`` lp-deploy writes goes
through :func:`save_config`, which keeps those legacy fields beside the new ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from lp_deploy.artifacts import CONFIG_FILE


def _legacy_rope(params: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` as transformers 4.x reads them."""
    if "rope_theta" not in params:
        return {}
    fields: dict[str, Any] = {"rope_theta": params["rope_theta"]}
    kind = params.get("rope_type", "default")
    extra = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    fields["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **extra}
    return fields


def legacy_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers-4 fields a transformers-5 ``config`` dict lacks (nested configs too)."""
    out: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        flat = rope if "rope_theta" in rope else rope.get("full_attention", {})
        out.update({k: v for k, v in _legacy_rope(flat).items() if k not in config})
        local = rope.get("sliding_attention")
        if isinstance(local, dict) and "rope_theta" in local:
            out.setdefault("rope_local_base_freq", local["rope_theta"])
    if "dtype" in config and "torch_dtype" not in config:
        out["torch_dtype"] = config["dtype"]
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config") and "model_type" in value:
            out[key] = {**value, **legacy_fields(value)}
    return out


def add_legacy_fields(directory: str | Path) -> None:
    """Rewrite ``directory/config.json`` with :func:`legacy_fields` added."""
    path = Path(directory) / CONFIG_FILE
    config = json.loads(path.read_text())
    extra = legacy_fields(config)
    if extra:
        path.write_text(json.dumps({**config, **extra}, indent=2, sort_keys=True) + "\n")


def save_config(config: PretrainedConfig, directory: str | Path) -> None:
    """``config.save_pretrained(directory)`` readable by transformers 4.x and 5.x."""
    config.save_pretrained(directory)
    add_legacy_fields(directory)
