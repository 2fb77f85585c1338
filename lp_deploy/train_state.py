"""Training state of ``distill`` on disk (safetensors + JSON), written atomically so that a
killed run resumes from the last complete save and ends with the same patch.

A save is atomic as a whole: the tensors go to a fresh ``state.<id>.safetensors`` (with the
save id in its metadata), then ``state.json`` (which names that file and id) replaces the old
JSON in one ``os.replace``, and only then are older tensor files deleted. A kill at any point
leaves the old JSON next to the old tensors, or the new JSON next to the new tensors."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lp_deploy.errors import LpDeployError

STATE_JSON = "state.json"
TENSORS_GLOB = "state.*.safetensors"


@dataclass
class TrainState:
    """Where training stands; ``key`` fingerprints the run it belongs to."""

    key: dict[str, Any]
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in the current epoch
    step: int = 0  # optimiser steps completed in total
    loss_sum: float = 0.0  # current epoch's train loss so far
    train_loss: list[float] = field(default_factory=list)  # per completed epoch
    val_loss: list[float] = field(default_factory=list)  # index 0: before training
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflat_optimizer(tensors: dict[str, torch.Tensor], groups: Any) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_state(
    directory: Path,
    state: TrainState,
    params: dict[int, torch.nn.Parameter],
    best: dict[int, torch.Tensor],
    opt: torch.optim.Optimizer,
) -> None:
    """Write the state: a new tensor file first, then the JSON naming it (the commit point)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, groups = _flat_optimizer(opt)
    tensors.update({f"param.{pos}": p.detach().cpu().contiguous() for pos, p in params.items()})
    tensors.update({f"best.{pos}": t.detach().cpu().contiguous() for pos, t in best.items()})
    tensors["rng"] = torch.get_rng_state()
    save_id = uuid.uuid4().hex
    name = f"state.{save_id}.safetensors"
    save_file(tensors, str(directory / name), metadata={"save_id": save_id})
    record = {"state": asdict(state), "param_groups": groups, "tensors": name, "save_id": save_id}
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, directory / STATE_JSON)
    for stale in directory.glob(TENSORS_GLOB):
        if stale.name != name:
            stale.unlink(missing_ok=True)


def _record(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_JSON
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def has_state(directory: Path) -> bool:
    record = _record(directory)
    return record is not None and (directory / str(record.get("tensors"))).is_file()


def _load_tensors(directory: Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / str(record.get("tensors"))
    try:
        with safe_open(str(path), "pt") as f:
            save_id = (f.metadata() or {}).get("save_id")
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise LpDeployError(f"{path} is corrupt ({exc})") from exc
    if save_id != record.get("save_id"):
        raise LpDeployError(
            f"--resume: {path} (save {save_id}) does not belong to {directory / STATE_JSON} "
            f"(save {record.get('save_id')}); run without --resume to start over"
        )
    return tensors


def load_state(
    directory: Path,
    key: dict[str, Any],
    params: dict[int, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
) -> tuple[TrainState, dict[int, torch.Tensor]]:
    """Restore parameters, optimiser and RNG; the state and the best patch so far."""
    if not has_state(directory):
        raise LpDeployError(
            f"--resume: no saved training state in {directory}; run without --resume"
        )
    record = _record(directory)
    assert record is not None
    state = TrainState(**record["state"])
    if state.key != key:
        raise LpDeployError(
            f"--resume: the state in {directory} belongs to a run with other settings "
            f"({state.key}); run without --resume to start over"
        )
    tensors = _load_tensors(directory, record)
    with torch.no_grad():
        for pos, p in params.items():
            p.copy_(tensors[f"param.{pos}"])
    opt.load_state_dict(_unflat_optimizer(tensors, record["param_groups"]))
    torch.set_rng_state(tensors["rng"])
    best = {pos: tensors[f"best.{pos}"] for pos in params}
    return state, best
