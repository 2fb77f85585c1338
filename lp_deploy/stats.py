"""Streamed activation statistics at every layer boundary, in one calibration pass.

Boundary ``b`` is the hidden state entering decoder layer ``b`` (``b = L`` is the state
entering the final norm). Each batch is reduced on the fly, so memory does not grow with
the number of calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lp_deploy.adapters import ModelAdapter
from lp_deploy.hadamard import hadamard_transform, is_supported


@dataclass
class ActivationStats:
    """Sums over calibration tokens (float64); means are derived."""

    n_tokens: int
    cos_sum: torch.Tensor  # (L+1, L+1): sum over tokens of cos(h_i, h_j)
    abs_sum: torch.Tensor  # (L+1, d): sum of |h|
    abs_rot_sum: torch.Tensor | None  # (L+1, d): sum of |h H|, None if d has no Hadamard

    @property
    def num_layers(self) -> int:
        return int(self.cos_sum.shape[0]) - 1

    def cosine(self, i: int, j: int) -> float:
        """Mean cosine similarity of the states entering layers ``i`` and ``j``."""
        return float(self.cos_sum[i, j]) / self.n_tokens

    def abs_mean(self, boundary: int) -> torch.Tensor:
        return self.abs_sum[boundary] / self.n_tokens

    def abs_rot_mean(self, boundary: int) -> torch.Tensor:
        if self.abs_rot_sum is None:
            raise ValueError("no rotated statistics were collected (hidden size has no Hadamard)")
        return self.abs_rot_sum[boundary] / self.n_tokens

    def save(self, path: Path) -> None:
        tensors = {"cos_sum": self.cos_sum, "abs_sum": self.abs_sum}
        if self.abs_rot_sum is not None:
            tensors["abs_rot_sum"] = self.abs_rot_sum
        save_file(tensors, str(path), metadata={"n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            n_tokens = int((fh.metadata() or {})["n_tokens"])
        t = load_file(str(path))
        return cls(n_tokens, t["cos_sum"], t["abs_sum"], t.get("abs_rot_sum"))


class _Recorder:
    """Forward pre-hooks that keep the current batch's state at every boundary."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.states: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [
            m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, m in enumerate(modules)
        ]

    def _hook(self, index: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state = args[0] if args else kwargs["hidden_states"]
            self.states[index] = state.detach()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reduce(
    states: torch.Tensor, rotate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cos_sum, abs_sum, abs_rot_sum) of states shaped (L+1, tokens, d), in float64."""
    h = states.to(torch.float64)
    unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos_sum = torch.einsum("ind,jnd->ij", unit, unit)
    abs_sum = h.abs().sum(dim=1)
    abs_rot = hadamard_transform(h).abs().sum(dim=1) if rotate else None
    return cos_sum, abs_sum, abs_rot


@torch.no_grad()
def collect_stats(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
) -> ActivationStats:
    """One pass over ``windows`` (n, seqlen) accumulating :class:`ActivationStats`."""
    layers = list(adapter.layers)
    recorder = _Recorder([*layers, adapter.final_norm])
    rotate = is_supported(adapter.hidden_size)
    n_bound, d = len(layers) + 1, adapter.hidden_size
    cos_sum = torch.zeros(n_bound, n_bound, dtype=torch.float64)
    abs_sum = torch.zeros(n_bound, d, dtype=torch.float64)
    abs_rot_sum = torch.zeros(n_bound, d, dtype=torch.float64) if rotate else None
    device = adapter.embeddings.weight.device
    try:
        for start in tqdm(
            range(0, len(windows), batch_size), desc="calibration", disable=not progress
        ):
            batch = windows[start : start + batch_size].to(device)
            adapter.backbone(input_ids=batch, use_cache=False)
            states = torch.stack([s.reshape(-1, d).cpu() for s in recorder.states if s is not None])
            c, a, r = _reduce(states, rotate)
            cos_sum += c
            abs_sum += a
            if abs_rot_sum is not None and r is not None:
                abs_rot_sum += r
    finally:
        recorder.close()
    return ActivationStats(int(windows.numel()), cos_sum, abs_sum, abs_rot_sum)
