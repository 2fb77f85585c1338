"""Streamed activation statistics at every layer boundary, in one calibration pass.

Boundary ``b`` is the hidden state entering decoder layer ``b`` (``b = L`` is the state
entering the final norm). Each batch is reduced on the fly, so memory does not grow with
the number of calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lp_deploy.adapters import ModelAdapter
from lp_deploy.hadamard import hadamard_kron_factors, hadamard_transform, is_supported


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
    """Forward pre-hooks that keep the current batch's state at every boundary (the
    reference path: states copied out whole, reduced by :func:`_reduce` in float64)."""

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


class _Reducer:
    """Reduces each boundary's state on the state's device, window by window.

    Per boundary: ``sum |h|`` and ``sum |h H|`` over the window's tokens (float32 partial
    sums, added to float64 totals; float64 throughout for a float64 model) and the unit
    states ``h / |h|``, kept for the window only; when the window ends,
    ``cos_sum += U U^T`` (one GEMM over the window's tokens, added in float64). No state is
    kept past its window or copied to the CPU. :meth:`attach` feeds it from forward
    pre-hooks (the in-memory pass); the layer-streamed pass (:mod:`lp_deploy.offload`)
    calls :meth:`boundary` and :meth:`add_cosines` itself.
    """

    def __init__(self, n: int, d: int, rotate: bool, device: torch.device) -> None:
        self.d, self.rotate = d, rotate
        self.cos_sum = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(n, d, dtype=torch.float64, device=device)
        self.abs_rot_sum = torch.zeros(n, d, dtype=torch.float64, device=device) if rotate else None
        self.units: torch.Tensor | None = None  # (boundaries, tokens, d) of the current window
        self.seen = [False] * n
        self._factors: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}
        self.handles: list[Any] = []

    def attach(self, modules: list[nn.Module]) -> _Reducer:
        """Reduce the input of ``modules[i]`` as boundary ``i`` whenever it runs."""
        self.handles = [
            m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, m in enumerate(modules)
        ]
        return self

    def _hook(self, index: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.add(index, args[0] if args else kwargs["hidden_states"])

        return hook

    def boundary(self, index: int, state: torch.Tensor) -> torch.Tensor:
        """Add one window's ``|h|`` sums at boundary ``index``; return its unit states."""
        device = self.abs_sum.device
        work = torch.float64 if state.dtype == torch.float64 else torch.float32
        h = state.detach().reshape(-1, self.d).to(device=device, dtype=work)
        self.abs_sum[index] += h.abs().sum(dim=0).double()
        if self.abs_rot_sum is not None:
            self.abs_rot_sum[index] += self._rotate(h).abs().sum(dim=0).double()
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def add(self, index: int, state: torch.Tensor) -> None:
        """Reduce boundary ``index`` of the current window."""
        unit = self.boundary(index, state)
        if self.units is None:
            self.units = unit.new_zeros(len(self.seen), *unit.shape)
        self.units[index] = unit
        self.seen[index] = True

    def _rotate(self, h: torch.Tensor) -> torch.Tensor:
        """``h H`` as ``A^T X B`` (two small MatMuls; see :func:`hadamard_kron_factors`)."""
        key = (h.dtype, h.device)
        if key not in self._factors:
            self._factors[key] = hadamard_kron_factors(self.d, h.dtype, h.device)
        a, b = self._factors[key]
        return (torch.matmul(a.T, h.reshape(h.shape[0], a.shape[0], b.shape[0])) @ b).reshape(
            h.shape
        )

    def add_cosines(self, units: torch.Tensor) -> None:
        """``cos_sum += U U^T`` for one window's unit states ``(boundaries, tokens, d)``."""
        flat = units.reshape(units.shape[0], -1)
        self.cos_sum += (flat @ flat.T).double()

    def end_window(self) -> None:
        """Add the window's cosines (every pair of boundaries) and start a new window."""
        if self.units is None or not all(self.seen):
            missing = [i for i, seen in enumerate(self.seen) if not seen]
            raise RuntimeError(f"the forward pass did not reach boundaries {missing}")
        self.add_cosines(self.units)
        self.units, self.seen = None, [False] * len(self.seen)

    def result(self, n_tokens: int) -> ActivationStats:
        """The totals as :class:`ActivationStats` (on the CPU)."""
        rot = None if self.abs_rot_sum is None else self.abs_rot_sum.cpu()
        return ActivationStats(n_tokens, self.cos_sum.cpu(), self.abs_sum.cpu(), rot)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reduce(
    states: torch.Tensor, rotate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(cos_sum, abs_sum, abs_rot_sum) of states shaped (L+1, tokens, d), in float64 (the
    reference reduction; :func:`collect_stats` computes the same sums on the model's device)."""
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
    """One pass over ``windows`` (n, seqlen) accumulating :class:`ActivationStats`, reduced
    boundary by boundary on the model's device (see :class:`_Reducer`)."""
    device = adapter.embeddings.weight.device
    rotate = is_supported(adapter.hidden_size)
    modules = [*adapter.layers, adapter.final_norm]
    reducer = _Reducer(len(modules), adapter.hidden_size, rotate, device).attach(modules)
    try:
        for start in tqdm(
            range(0, len(windows), batch_size), desc="calibration", disable=not progress
        ):
            adapter.backbone(
                input_ids=windows[start : start + batch_size].to(device), use_cache=False
            )
            reducer.end_window()
    finally:
        reducer.close()
    return reducer.result(int(windows.numel()))


# --------------------------------------------------------------------------- least squares

#: where a least-squares map reads its input: the state entering the gap ("input"), or the
#: MLP output of the last layer before the gap ("mlp", ReplaceMe's form)
GRAM_SITES = ("input", "mlp")


@dataclass
class GramStats:
    """Streamed normal equations of one least-squares map ``X -> Y`` (float64 sums)."""

    n_tokens: int
    xtx: torch.Tensor  # (d, d): sum of x^T x
    xty: torch.Tensor  # (d, d): sum of x^T y

    @classmethod
    def zeros(cls, d: int) -> GramStats:
        z = torch.zeros(d, d, dtype=torch.float64)
        return cls(0, z, z.clone())

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x64, y64 = x.reshape(-1, x.shape[-1]).to(torch.float64), y.reshape(-1, y.shape[-1])
        self.xtx += x64.T @ x64
        self.xty += x64.T @ y64.to(torch.float64)
        self.n_tokens += int(x64.shape[0])


class _MlpRecorder:
    """Forward hooks keeping the current batch's MLP output of chosen layers."""

    def __init__(self, adapter: ModelAdapter, layers: list[int]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        mods = list(adapter.layers)
        projections = [adapter.layer_adapter(mods[i]).mlp_output for i in layers]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise ValueError(f"layers {layers}: an MLP output is not one nn.Linear (experts?)")
        self.handles = [
            cast(nn.Linear, p).register_forward_hook(self._hook(i))
            for i, p in zip(layers, projections, strict=True)
        ]

    def _hook(self, index: int) -> Any:
        def hook(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
            self.outputs[index] = output.detach()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _gram_pair(
    site: str, start: int, end: int, states: list[Any], mlp: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one gap ``[start, end)``: boundary states, or ReplaceMe's MLP form."""
    if site == "input":
        return states[start], states[end]
    x = mlp[start - 1]
    bypass = states[start] - x  # the residual that does not go through that MLP
    return x, states[end] - bypass


@torch.no_grad()
def collect_gram(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    gaps: list[tuple[str, int, int]],
    batch_size: int = 1,
    progress: bool = True,
) -> dict[tuple[str, int, int], GramStats]:
    """One pass over ``windows`` accumulating :class:`GramStats` for each ``(site, start,
    end)``; memory is ``2 d^2`` float64 per gap whatever the number of windows."""
    bad = [g for g in gaps if g[0] not in GRAM_SITES or (g[0] == "mlp" and g[1] < 1)]
    if bad:
        raise ValueError(
            f"bad least-squares requests {bad}: site in {GRAM_SITES}, mlp needs start>=1"
        )
    layers = list(adapter.layers)
    recorder = _Recorder([*layers, adapter.final_norm])
    mlp = _MlpRecorder(adapter, sorted({s - 1 for site, s, _ in gaps if site == "mlp"}))
    sums = {g: GramStats.zeros(adapter.hidden_size) for g in gaps}
    device = adapter.embeddings.weight.device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="lstsq", disable=not progress):
            adapter.backbone(
                input_ids=windows[start : start + batch_size].to(device), use_cache=False
            )
            for key, acc in sums.items():
                acc.add(*(t.cpu() for t in _gram_pair(*key, recorder.states, mlp.outputs)))
    finally:
        recorder.close()
        mlp.close()
    return sums
