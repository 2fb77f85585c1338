"""The distillation training state is saved atomically as a whole: a save killed between its
tensor file and its JSON resumes from the previous save (parameters and counters together)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lp_deploy.train_state as ts
from lp_deploy.errors import LpDeployError
from lp_deploy.train_state import TrainState, has_state, load_state, save_state

KEY = {"run": 1}


def _setup(value: float) -> tuple[dict[int, torch.nn.Parameter], torch.optim.Optimizer]:
    params = {2: torch.nn.Parameter(torch.full((3, 3), value))}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
    params[2].grad = torch.ones(3, 3)
    opt.step()
    return params, opt


def _save(directory: Path, step: int, value: float) -> None:
    params, opt = _setup(value)
    state = TrainState(key=KEY, step=step, loss_sum=float(step))
    save_state(directory, state, params, {2: params[2].detach().clone()}, opt)


def _load(directory: Path) -> tuple[TrainState, torch.Tensor]:
    params, opt = _setup(0.0)
    state, _best = load_state(directory, KEY, params, opt)
    return state, params[2].detach()


def test_a_save_killed_before_its_json_leaves_the_previous_save_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, step=1, value=1.0)
    first, first_params = _load(tmp_path)

    replace = os.replace

    def killed(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == ts.STATE_JSON:
            raise KeyboardInterrupt  # the process dies once the tensors are written
        replace(src, dst)

    monkeypatch.setattr(ts.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, step=2, value=5.0)
    monkeypatch.undo()
    assert has_state(tmp_path)
    state, got = _load(tmp_path)
    assert state.step == first.step == 1 and state.loss_sum == 1.0
    torch.testing.assert_close(got, first_params, rtol=0, atol=0)
    _save(tmp_path, step=3, value=7.0)  # the next complete save cleans the orphan up
    assert len(list(tmp_path.glob(ts.TENSORS_GLOB))) == 1
    assert _load(tmp_path)[0].step == 3


def test_tensors_of_another_save_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a", step=1, value=1.0)
    _save(tmp_path / "b", step=2, value=2.0)
    record = json.loads((tmp_path / "a" / ts.STATE_JSON).read_text())
    other = json.loads((tmp_path / "b" / ts.STATE_JSON).read_text())["tensors"]
    os.replace(tmp_path / "b" / other, tmp_path / "a" / record["tensors"])
    with pytest.raises(LpDeployError, match="does not belong to"):
        _load(tmp_path / "a")
