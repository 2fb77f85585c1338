"""Run a pruned model in two parts around its first patch.

Layers before the first patch are frozen and unchanged by pruning, so the hidden state
entering that patch is a constant per window (the *prefix*): computed once and kept on disk,
after which every training step runs only from the patch to the logits (the *suffix*), and
only the logits of the teacher's top-k ids are formed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

from lp_deploy.adapters import ModelAdapter
from lp_deploy.errors import CheckpointError
from lp_deploy.prune import installed_patches


def first_patch_position(adapter: ModelAdapter) -> int:
    """Index of the first patched layer (the layer count: the patch before the final norm)."""
    patches = installed_patches(adapter)
    if not patches:
        raise CheckpointError(
            "the checkpoint has no patch (it was pruned with --patch none); distillation "
            "trains the patch: create one with 'lp-deploy patch --patch rotate' (or diag)"
        )
    return min(patches)


@contextlib.contextmanager
def only_layers(adapter: ModelAdapter, start: int, stop: int) -> Iterator[None]:
    """Temporarily keep only decoder layers ``[start, stop)`` (config updated, then restored)."""
    layers = list(adapter.layers)
    adapter.set_layers(layers[start:stop])
    try:
        yield
    finally:
        adapter.set_layers(layers)


def prefix_hidden(adapter: ModelAdapter, ids: torch.Tensor, position: int) -> torch.Tensor:
    """The hidden state entering layer ``position`` (before its patch), shape (B, T, d)."""
    captured: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    handle = adapter.final_norm.register_forward_pre_hook(grab)
    try:
        with torch.no_grad(), only_layers(adapter, 0, position):
            adapter.backbone(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def _replace_input(value: torch.Tensor) -> Any:
    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return (value, *args[1:]), kwargs

    return hook


def suffix_hidden(adapter: ModelAdapter, prefix: torch.Tensor, position: int) -> torch.Tensor:
    """The final (normed) hidden state from the prefix: the patch, the layers after it, the
    final norm. The prefix replaces the input of the first remaining module, so whatever the
    backbone does to its embeddings (e.g. Granite's multiplier) does not touch it."""
    layers = list(adapter.layers)
    first = layers[position] if position < len(layers) else adapter.final_norm
    handle = first.register_forward_pre_hook(_replace_input(prefix), with_kwargs=True)
    try:
        with only_layers(adapter, position, len(layers)):
            out = adapter.backbone(inputs_embeds=prefix, use_cache=False)
    finally:
        handle.remove()
    return out.last_hidden_state


def _plain_logits(adapter: ModelAdapter) -> bool:
    """Whether the family's logits are just ``lm_head(hidden)`` (no scaling or capping)."""
    return type(adapter).logits is ModelAdapter.logits


def topk_logits(adapter: ModelAdapter, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logits at ``ids`` (B, T, k); for plain ``lm_head`` families only those k rows of
    the lm_head are used, not the full vocabulary."""
    if not _plain_logits(adapter):
        return adapter.logits(hidden).gather(-1, ids)
    head = adapter.lm_head
    rows = head.weight[ids]  # (B, T, k, d)
    logits = torch.einsum("btd,btkd->btk", hidden.to(rows.dtype), rows)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return logits


def topk_kl(student: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` over the same k ids (student log-softmax over those k),
    summed over k and averaged over every token of the batch."""
    log_q = F.log_softmax(student.float(), dim=-1)
    p = teacher_probs.float()
    kl = torch.xlogy(p, p) - p * log_q
    return kl.sum(-1).mean()


def full_model_loss(
    model: Any, input_ids: torch.Tensor, teacher_ids: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """The same loss from the whole model's full-vocabulary logits (the reference)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return topk_kl(logits.gather(-1, teacher_ids), probs)


def prefix_digest(adapter: ModelAdapter, position: int) -> str:
    """sha256 of the weights the prefix depends on (embeddings and layers before the patch)."""
    digest = hashlib.sha256()
    modules = [adapter.embeddings, *list(adapter.layers)[:position]]
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
