"""Delete the planned layers and put each gap's patch in front of what follows the gap."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lp_deploy.adapters import ModelAdapter
from lp_deploy.modules import PatchedInput, patch_of, unwrap
from lp_deploy.selection import Gap, PruningPlan


def apply_plan(
    adapter: ModelAdapter, plan: PruningPlan, patches: Mapping[Gap, nn.Module | None] | None = None
) -> None:
    """Prune in place; a gap ending at the last layer gets its patch before the final norm."""
    layers = list(adapter.layers)
    if len(layers) != plan.num_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, the model has {len(layers)}")
    kept: list[nn.Module] = [layers[i] for i in plan.kept]
    for gap, patch in (patches or {}).items():
        if patch is None:
            continue
        pos = plan.patch_position(gap)
        if pos < len(kept):
            kept[pos] = PatchedInput(kept[pos], patch)
        else:
            adapter.set_final_norm(PatchedInput(adapter.final_norm, patch))
    for index, layer in enumerate(kept):
        adapter.layer_adapter(layer).set_layer_index(index)
    adapter.set_layers(kept)


def installed_patches(adapter: ModelAdapter) -> dict[int, nn.Module]:
    """Patches in the model by position: layer index, or the layer count for the final norm."""
    found = {i: p for i, layer in enumerate(adapter.layers) if (p := patch_of(layer)) is not None}
    final = patch_of(adapter.final_norm)
    if final is not None:
        found[len(adapter.layers)] = final
    return found


def set_patch(adapter: ModelAdapter, position: int, patch: nn.Module | None) -> None:
    """Install, replace or (``patch=None``) remove the patch at ``position``."""
    layers = list(adapter.layers)
    target = layers[position] if position < len(layers) else adapter.final_norm
    new = unwrap(target) if patch is None else PatchedInput(unwrap(target), patch)
    if position < len(layers):
        layers[position] = new
        adapter.set_layers(layers)
    else:
        adapter.set_final_norm(new)


@torch.no_grad()
def fold_into_mlp_output(linear: nn.Linear, matrix: torch.Tensor) -> None:
    """Make ``linear`` (a down_proj, ``y = a W^T + b``) compute ``y @ matrix`` instead:
    ``W <- matrix^T W``, ``b <- b matrix`` (float64 arithmetic, cast back)."""
    m = matrix.to(torch.float64)
    w = linear.weight
    w.copy_((m.T @ w.to(torch.float64)).to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.to(torch.float64) @ m).to(linear.bias.dtype))


def fold_mlp_maps(
    adapter: ModelAdapter, plan: PruningPlan, maps: Mapping[Gap, torch.Tensor]
) -> list[int]:
    """On a model pruned by ``plan``: fold each gap's map into the down_proj of the last kept
    layer before the gap. Returns those layers' new indices."""
    layers = list(adapter.layers)
    folded = []
    for gap, matrix in maps.items():
        if gap.start < 1:
            raise ValueError(f"gap {gap} has no layer before it to fold a map into")
        index = plan.patch_position(gap) - 1  # new index of original layer gap.start - 1
        down = adapter.layer_adapter(layers[index]).mlp_output
        if not isinstance(down, nn.Linear):
            raise ValueError(f"layer {index}'s MLP output is not one nn.Linear (experts?)")
        fold_into_mlp_output(down, matrix)
        folded.append(index)
    return folded
