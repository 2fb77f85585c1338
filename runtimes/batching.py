"""Padded batches of token ids, their position ids, and the KV cache type every runtime uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: per layer ``(key, value)``, each ``[batch, kv_heads, past_sequence_length, head_dim]``
Past = list[tuple[torch.Tensor, torch.Tensor]]
PADDING_SIDES = ("left", "right")


def positions_from_mask(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Position ids of the last ``seq - past_length`` columns of a (left or right) padded mask."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_length:]


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Ids, attention mask and per-row offset of the first real token, padded on ``side``."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[i, start : start + len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, start : start + len(row)] = 1
        offsets.append(start)
    return ids, mask, offsets
