"""Layer-streamed calibration: the statistics of a model larger than memory.

:func:`streamed_stats` gives the same :class:`~lp_deploy.stats.ActivationStats` as
:func:`~lp_deploy.stats.collect_stats` with one decoder layer resident at a time:

1. the model is built empty (accelerate's ``init_empty_weights``: parameters on the meta
   device), and only the tensors outside the decoder layers are read (embeddings, final norm);
2. one forward pass per batch with every decoder layer replaced by a recorder gives the
   state entering layer 0 and the arguments the family's forward hands each layer (rotary
   embeddings, masks, per-layer sliding windows), so no family's forward is rewritten here;
3. for each layer in turn: its tensors are read from the safetensors files (``safe_open``
   reads single tensors), every batch's state goes through it, the boundary is reduced
   (:class:`~lp_deploy.stats._Reducer`, the in-memory pass's reducer), the layer is freed.

Cosines need every boundary of a window at once: the unit states of each boundary are
written to a temporary file and read back one window at a time at the end, so memory holds
one layer, the states of the calibration batch, and one window's unit states.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.utils import GENERATION_CONFIG_NAME

from lp_deploy.adapters import ModelAdapter, get_adapter
from lp_deploy.artifacts import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, Kind, inspect_artifact
from lp_deploy.errors import LpDeployError
from lp_deploy.hadamard import is_supported
from lp_deploy.model import LoadedModel
from lp_deploy.prune import apply_plan
from lp_deploy.selection import PruningPlan
from lp_deploy.sources import source_record
from lp_deploy.stats import ActivationStats, _Reducer

log = logging.getLogger(__name__)


class OffloadError(LpDeployError):
    """Layer-streamed calibration cannot read this model."""


# --------------------------------------------------------------------------- weights on disk


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model directory (sharded or not)."""
    index = model_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / WEIGHTS_FILE
    if single.is_file():
        with safe_open(str(single), "pt") as fh:
            return {name: single for name in fh.keys()}  # noqa: SIM118 (not a dict)
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise OffloadError(
        f"--offload streams layers from safetensors files, and {model_dir} has neither "
        f"{WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} (found: {', '.join(found[:8]) or 'nothing'}). "
        "Save the model with save_pretrained (safetensors), or calibrate in memory "
        "(--no-offload)."
    )


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the model's safetensors files."""
    return sum(p.stat().st_size for p in set(weight_files(model_dir).values()))


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class OffloadDecision:
    """Whether to stream the layers, and why (logged by the stage)."""

    offload: bool
    reason: str


def decide_offload(
    requested: bool | None,
    model_dir: Path | None,
    dtype: torch.dtype = torch.float32,
    device_map: str | None = None,
) -> OffloadDecision:
    """``requested`` True/False is obeyed; None (auto) streams when the weights, at
    ``dtype``, exceed the memory available now (``model_dir`` None: the source is not a
    safetensors directory, in memory; a ``device_map``: accelerate places the weights)."""
    if requested and device_map is not None:
        raise OffloadError(
            "--offload streams the layers through one device, --device-map spreads the whole "
            "model over several: choose one"
        )
    if requested and model_dir is None:
        raise OffloadError(
            "--offload streams layers from safetensors files: give a model directory "
            "(save_pretrained) or a built-in alias, not a GGUF file, hub id or checkpoint"
        )
    if requested is not None:
        return OffloadDecision(requested, "--offload" if requested else "--no-offload")
    if device_map is not None:
        return OffloadDecision(False, f"auto: --device-map {device_map} places the weights")
    if model_dir is None:
        return OffloadDecision(False, "auto: the source is not a safetensors model directory")
    need = _bytes_at(model_dir, dtype)
    free = available_memory()
    verdict = "does not fit" if need > free else "fits"
    reason = (
        f"auto: the weights need {need / 2**30:.2f} GiB at {str(dtype).replace('torch.', '')}, "
        f"{free / 2**30:.2f} GiB available: {verdict}"
    )
    return OffloadDecision(need > free, reason)


def _bytes_at(model_dir: Path, dtype: torch.dtype) -> int:
    """Size of the weights once loaded at ``dtype`` (from the safetensors headers)."""
    total = 0
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(model_dir).items():
        by_file.setdefault(file, []).append(name)
    size = torch.empty((), dtype=dtype).element_size()
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as fh:
            for name in names:
                shape = fh.get_slice(name).get_shape()
                total += int(np.prod(shape, dtype=np.int64)) * size
    return total


class _TensorReader:
    """Reads named tensors of a model directory into an empty module, file by file."""

    def __init__(self, model_dir: Path) -> None:
        self.files = weight_files(model_dir)

    def load(
        self,
        module: nn.Module,
        prefix: str,
        device: torch.device,
        dtype: torch.dtype,
        recurse: bool = True,
    ) -> None:
        """Fill ``module``'s parameters and persistent buffers (checkpoint names
        ``prefix`` + local name; ``recurse`` False: its own, not its children's); the files
        are closed again, so nothing stays mapped."""
        local = list(module.state_dict(keep_vars=True)) if recurse else _own_tensors(module)
        missing = [prefix + n for n in local if prefix + n not in self.files]
        if missing:
            raise OffloadError(
                f"the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing): its "
                "tensor names differ from the model's modules (transformers converts them at "
                "load time, e.g. fused mixture-of-experts weights); --offload reads tensors by "
                "module name, so calibrate this model in memory (--no-offload)"
            )
        by_file: dict[Path, list[str]] = {}
        for name in local:
            by_file.setdefault(self.files[prefix + name], []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as fh:
                for name in names:
                    value = fh.get_tensor(prefix + name)
                    cast = dtype if value.is_floating_point() else None
                    set_module_tensor_to_device(module, name, device, value=value, dtype=cast)


def _own_tensors(module: nn.Module) -> list[str]:
    """Names of a module's own parameters and persistent buffers (not its children's)."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    skip = module._non_persistent_buffers_set
    return names + [n for n, b in module.named_buffers(recurse=False) if n not in skip]


def _free(module: nn.Module) -> None:
    """Give a loaded module's memory back (its tensors go to the meta device)."""
    module.to("meta")


# --------------------------------------------------------------------------- the pass


@dataclass
class _LayerCall:
    """The arguments one decoder layer receives for one batch (state excluded)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _CallRecorder:
    """Replaces every decoder layer's forward by a recorder that passes the state on."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.calls: list[list[_LayerCall]] = [[] for _ in layers]
        self.entry: list[torch.Tensor] = []

    def _stub(self, index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            state = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                self.entry.append(state)
            self.calls[index].append(_LayerCall(args[1:], kwargs))
            return state

        return forward

    @contextmanager
    def installed(self) -> Iterator[None]:
        for i, layer in enumerate(self.layers):
            layer.forward = self._stub(i)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward  # the class's forward again


class _UnitSpill:
    """Unit states of every boundary, on disk: one window's block is read back at a time."""

    def __init__(self, counts: list[int], boundaries: int, d: int, dtype: torch.dtype) -> None:
        self.counts, self.boundaries, self.d = counts, boundaries, d
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32
        item = np.dtype(self.np_dtype).itemsize
        self.block = [n * d * item for n in counts]  # bytes of one boundary of a batch
        self.base = np.cumsum([0, *[b * boundaries for b in self.block]]).tolist()
        self.fh: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())

    def write(self, batch: int, boundary: int, units: torch.Tensor) -> None:
        self.fh.seek(self.base[batch] + boundary * self.block[batch])
        self.fh.write(units.detach().cpu().numpy().astype(self.np_dtype, copy=False).tobytes())

    def read(self, batch: int) -> torch.Tensor:
        """``(boundaries, tokens, d)`` of one batch."""
        self.fh.seek(self.base[batch])
        raw = self.fh.read(self.block[batch] * self.boundaries)
        flat = np.frombuffer(raw, dtype=self.np_dtype)
        return torch.from_numpy(flat.copy()).view(self.boundaries, self.counts[batch], self.d)

    def close(self) -> None:
        self.fh.close()


def empty_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The model of ``model_dir`` with its parameters on the meta device (no weights read)."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    if (model_dir / GENERATION_CONFIG_NAME).is_file():  # as from_pretrained would
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers the empty model computed itself (rotary frequencies) to ``device``."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _outside_layers(adapter: ModelAdapter) -> list[tuple[str, nn.Module]]:
    """The backbone's modules with tensors outside the decoder layers (embeddings, norm)."""
    names = _names(adapter.model)
    layers = {id(m) for m in adapter.layers}
    out = []
    for child in adapter.backbone.children():
        outer = id(child) not in layers and child is not adapter.layers
        if outer and any(True for _ in child.state_dict()):
            out.append((names[id(child)], child))
    return out


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def streamed_stats(
    model_dir: Path,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> ActivationStats:
    """:class:`ActivationStats` of the model in ``model_dir`` over ``windows`` (n, seqlen),
    reading one decoder layer at a time from its safetensors files (see the module doc)."""
    device = torch.device(device)
    reader = _TensorReader(model_dir)
    adapter = get_adapter(empty_model(model_dir, dtype, trust_remote_code))
    _buffers_to(adapter.model, device)
    layers = list(adapter.layers)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    recorder = _record_calls(adapter, reader, layers, batches, device, dtype)
    d, n = adapter.hidden_size, len(layers) + 1
    reducer = _Reducer(n, d, is_supported(d), device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    spill = _UnitSpill([b.numel() for b in batches], n, d, work)
    try:
        states = recorder.entry
        for b, state in enumerate(states):
            spill.write(b, 0, reducer.boundary(0, state))
        names = _names(adapter.model)
        for i, layer in enumerate(tqdm(layers, desc="calibration (offload)", disable=not progress)):
            reader.load(layer, names[id(layer)] + ".", device, dtype)
            for b, call in enumerate(recorder.calls[i]):
                states[b] = _first(layer(states[b], *call.args, **call.kwargs))
                spill.write(b, i + 1, reducer.boundary(i + 1, states[b]))
            _free(layer)
        for b in range(len(batches)):
            reducer.add_cosines(spill.read(b).to(device))
    finally:
        spill.close()
    return reducer.result(int(windows.numel()))


def _record_calls(
    adapter: ModelAdapter,
    reader: _TensorReader,
    layers: list[nn.Module],
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> _CallRecorder:
    """Every batch's state entering layer 0 and every layer's arguments, from the family's
    own forward with the layers replaced by recorders (only the outer tensors loaded)."""
    outer = _outside_layers(adapter)
    for name, module in outer:
        reader.load(module, name + ".", device, dtype)
    recorder = _CallRecorder(layers)
    try:
        with recorder.installed():
            for batch in batches:
                adapter.backbone(input_ids=batch.to(device), use_cache=False)
    finally:
        for _, module in outer:
            _free(module)
    return recorder


# --------------------------------------------------------------------------- stage helpers


def model_dir_of(source: str | Path) -> Path | None:
    """The safetensors directory of a dense source (an alias's cached copy), else None."""
    artifact = inspect_artifact(source)
    if artifact.kind not in (Kind.ALIAS, Kind.MODEL):
        return None
    location, _ = source_record(artifact, hashes=False)
    path = Path(location)
    has_weights = (path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file()
    return path if has_weights else None


def load_skeleton(source: str | Path, trust_remote_code: bool = False) -> LoadedModel:
    """A dense source with its parameters on the meta device (tokenizer, config and source
    record real): enough to check options, select blocks and record the checkpoint's source."""
    artifact = inspect_artifact(source)
    location, info = source_record(artifact)
    model_dir = Path(location)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return LoadedModel(
        empty_model(model_dir, trust_remote_code=trust_remote_code), tokenizer, {}, info
    )


def load_pruned(
    model_dir: Path,
    plan: PruningPlan,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The model of ``model_dir`` with ``plan`` applied, reading only the kept layers'
    tensors (and those outside the layers): memory is the pruned model's, never the dense."""
    model = empty_model(model_dir, dtype, trust_remote_code)
    adapter = get_adapter(model)
    names = _names(model)
    tied = adapter.tied_embeddings or bool(getattr(model.config, "tie_word_embeddings", False))
    layers = list(adapter.layers)
    apply_plan(adapter, plan)
    reader, cpu = _TensorReader(model_dir), torch.device("cpu")
    for index in plan.kept:
        reader.load(layers[index], names[id(layers[index])] + ".", cpu, dtype)
    inside = {id(m) for layer in layers for m in layer.modules()}
    for name, module in model.named_modules():
        if id(module) in inside or (tied and module is adapter.lm_head):
            continue
        reader.load(module, f"{name}." if name else "", cpu, dtype, recurse=False)
    if tied:
        model.tie_weights()
        if not adapter.tied_embeddings:
            raise OffloadError("the lm_head could not be tied to the embeddings after loading")
    return model
