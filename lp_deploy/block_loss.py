"""Language-model loss of a model with one block of layers deleted and patched, computed from
cached hidden states.

The layers before a block ``[s, e)`` are untouched by deleting it, so the state entering
layer ``s`` is the dense model's: it is recorded once per window (one dense pass for every
boundary asked for), after which scoring a block runs only its patch, the layers from ``e`` on,
the final norm and the logits.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from lp_deploy.adapters import ModelAdapter
from lp_deploy.perplexity import window_nll
from lp_deploy.prefix import only_layers, suffix_hidden
from lp_deploy.selection import Gap
from lp_deploy.stats import _MlpRecorder, _Recorder


class BlockLoss:
    """Mean next-token NLL over ``windows`` (n, seqlen) of the dense model behind
    ``adapter`` with one block deleted; states are cached per batch of ``batch_size``."""

    def __init__(self, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int = 1):
        self.adapter = adapter
        self.batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        self.states: dict[int, list[torch.Tensor]] = {}  # boundary -> state per batch
        self.mlp: dict[int, list[torch.Tensor]] = {}  # layer -> its MLP output per batch

    @property
    def device(self) -> torch.device:
        return self.adapter.embeddings.weight.device

    @torch.no_grad()
    def ensure(self, boundaries: Collection[int], mlp_layers: Collection[int] = ()) -> None:
        """Record the states entering ``boundaries`` and the MLP outputs of ``mlp_layers``
        that are not cached yet: one dense pass through the layers before the last of them
        (boundary ``top`` is what the final norm receives when only ``top`` layers run)."""
        want = sorted(set(boundaries) - set(self.states))
        want_mlp = sorted(set(mlp_layers) - set(self.mlp))
        if not want and not want_mlp:
            return
        top = max([*want, *(i + 1 for i in want_mlp)])  # run only the layers before it
        recorder = _Recorder([*list(self.adapter.layers)[:top], self.adapter.final_norm])
        mlp = _MlpRecorder(self.adapter, want_mlp)
        try:
            for ids in self.batches:
                with only_layers(self.adapter, 0, top):
                    self.adapter.backbone(input_ids=ids.to(self.device), use_cache=False)
                for b in want:
                    self.states.setdefault(b, []).append(_copy(recorder.states[b]))
                for i in want_mlp:
                    self.mlp.setdefault(i, []).append(mlp.outputs[i].clone())
        finally:
            recorder.close()
            mlp.close()

    @torch.no_grad()
    def nll(
        self, gap: Gap, patch: nn.Module | None = None, mlp_map: torch.Tensor | None = None
    ) -> tuple[float, int]:
        """Summed NLL and token count with ``gap`` deleted; ``patch`` applied to the state
        entering the first layer after the gap, or ``mlp_map`` folded into the output of the
        MLP of layer ``gap.start - 1`` (``lstsq-mlp``)."""
        self.ensure([gap.start], [gap.start - 1] if mlp_map is not None else [])
        total, count = 0.0, 0
        for index, ids in enumerate(self.batches):
            state = self.states[gap.start][index]
            if mlp_map is not None:
                out = self.mlp[gap.start - 1][index]
                state = state - out + out @ mlp_map.to(out.dtype)
            if patch is not None:
                state = patch(state)
            hidden = suffix_hidden(self.adapter, state, gap.end)
            nll, n = window_nll(self.adapter.logits(hidden), ids)
            total, count = total + nll, count + n
        return total, count

    def loss(
        self, gap: Gap, patch: nn.Module | None = None, mlp_map: torch.Tensor | None = None
    ) -> float:
        """Mean next-token NLL (the log of the perplexity) with ``gap`` deleted."""
        total, count = self.nll(gap, patch, mlp_map)
        return total / count


def _copy(state: torch.Tensor | None) -> torch.Tensor:
    if state is None:
        raise RuntimeError("the forward pass did not reach a boundary it was asked to record")
    return state.detach().clone()
