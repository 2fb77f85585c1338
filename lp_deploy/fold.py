"""Stage ``fold``: make the patch (almost) free by rotating the residual stream.

Every RMSNorm scale is folded into the projections that read the norm's output, then the
residual stream is rotated by the orthonormal Hadamard matrix ``H`` (computational
invariance: an unscaled RMSNorm commutes with an orthogonal matrix). In that basis a rotate
patch ``P = H diag(s) H^T`` is ``diag(s)``: one per-channel multiply. ``diag`` patches are
per-channel already and need no rotation. Where the architecture does not allow an exact
fold, the explicit MatMul is kept and the reason is reported. All weight surgery runs in
float64 and each tensor is cast back once.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_deploy.adapters import LayerAdapter, ModelAdapter, Projection, get_adapter
from lp_deploy.artifacts import Kind, check_out
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import install_online_hadamard, save_patched
from lp_deploy.errors import VerificationError
from lp_deploy.hadamard import hadamard_matrix, is_supported
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.modules import HadamardInputLinear, LinearPatch, ScalePatch, unwrap
from lp_deploy.prune import installed_patches, set_patch

log = logging.getLogger(__name__)
#: off-diagonal energy of ``H^T P H`` (relative), in units of the patch dtype's epsilon,
#: below which P counts as diagonal in the rotated basis (P is stored rounded to that dtype)
DIAGONAL_TOL_EPS = 64.0


#: verification windows taken from the checkpoint's calibration data when none are given
VERIFY_SAMPLES, VERIFY_SEQLEN, VERIFY_SEED = 4, 256, 1


@dataclass
class FoldConfig:
    """Options of the ``fold`` stage; mirrors ``lp-deploy fold``.

    ``verify``: the windows on which folded and unfolded logits are compared; None: the
    checkpoint's own calibration data (and text field), see :func:`default_verify_spec`.
    """

    patched: Path
    out: Path | None = None
    overwrite: bool = False
    rotate: bool = True
    verify: CalibrationSpec | None = None
    tolerance: float = 1e-4  # max |logit diff| / max |logit|
    progress: bool = True
    online_hadamard: bool = False  # x H at every down_proj input, H folded into its weight


@dataclass
class FoldReport:
    """What the fold did and what it cost."""

    mode: str  # "rotated" | "unrotated"
    reason: str | None
    untied_embeddings: bool
    params_before: int
    params_after: int
    patch_ops: dict[str, int]
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    online_hadamard: bool = False


def count_params(model: nn.Module) -> int:
    """Parameters, shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def count_patch_ops(adapter: ModelAdapter) -> dict[str, int]:
    """Patch operations left in the model: d x d MatMuls and per-channel multiplies."""
    patches = installed_patches(adapter).values()
    return {
        "matmul": sum(isinstance(p, LinearPatch) for p in patches),
        "per_channel_mul": sum(isinstance(p, ScalePatch) for p in patches),
    }


def _norm_probe(norm: nn.Module, d: int) -> str | None:
    """None when ``norm(x) == x / rms(x) * weight`` (plain RMSNorm), else why not."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.shape != (d,) or eps is None:
        return f"{type(norm).__name__} is not an RMSNorm with a per-channel weight"
    if getattr(norm, "bias", None) is not None:
        return f"{type(norm).__name__} has a bias"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, d, generator=gen) + 0.5
    x = x.to(weight.dtype)
    with torch.no_grad():
        got = norm(x).double()
        ref = (
            x.double()
            * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
            * weight.double()
        )
    if not torch.allclose(got, ref, rtol=1e-3, atol=1e-4):
        return f"{type(norm).__name__} is not a plain RMSNorm (x / rms(x) * w)"
    return None


def fold_blockers(adapter: ModelAdapter) -> list[str]:
    """Reasons the stream of this model cannot be rotated exactly (empty: it can)."""
    if adapter.fold_blocker:
        return [adapter.fold_blocker]
    d = adapter.hidden_size
    if not is_supported(d):
        return [f"hidden size {d} has no Hadamard construction"]
    reasons = {
        r
        for layer in adapter.layers
        for norm in (adapter.layer_adapter(layer).attn_norm, adapter.layer_adapter(layer).mlp_norm)
        if norm is not None and (r := _norm_probe(norm, d))
    }
    final = _norm_probe(_unwrapped_final_norm(adapter), d)
    if final:
        reasons.add(f"final norm: {final}")
    return sorted(reasons)


def _unwrapped_final_norm(adapter: ModelAdapter) -> nn.Module:
    return unwrap(adapter.final_norm)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def _fold_readers(linears: Any, scale: torch.Tensor, q: torch.Tensor) -> None:
    """``W <- W diag(g) Q`` for projections that read a norm's output."""
    for lin in linears:
        w = lin.weight.data.double() * scale.to(lin.weight.device)
        _set(lin.weight, w @ q.to(w.device))


def _rotate_writer(lin: Projection, q: torch.Tensor) -> None:
    """``W <- Q^T W`` (and ``b <- b Q``) for projections that write to the stream; a 3-D
    expert weight ``(experts, d, inter)`` is rotated per expert."""
    w = lin.weight.data.double()
    _set(lin.weight, q.T.to(w.device) @ w)
    bias = getattr(lin, "bias", None)
    if bias is not None:
        _set(bias, bias.data.double() @ q.to(w.device))


def _reset_norm(norm: nn.Module | None) -> torch.Tensor:
    """The norm's scale in float64 (ones without a norm); the norm's weight becomes ones."""
    if norm is None:
        return torch.ones((), dtype=torch.float64)
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)
    scale = weight.data.double().clone()
    weight.data.fill_(1.0)
    return scale


def _fold_layer(layer: LayerAdapter, q: torch.Tensor) -> None:
    _fold_readers(layer.attn_inputs, _reset_norm(layer.attn_norm), q)
    _fold_readers(layer.mlp_inputs, _reset_norm(layer.mlp_norm), q)
    _rotate_writer(layer.attn_output, q)
    _rotate_writer(layer.mlp_output, q)


def untie_embeddings(model: Any, adapter: ModelAdapter) -> None:
    """Give lm_head its own weight (needed once the stream is rotated)."""
    head = adapter.lm_head
    head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.tie_word_embeddings = False


def _rotate_patch(patch: nn.Module, q: torch.Tensor) -> nn.Module:
    """A patch in the rotated basis: ScalePatch when ``Q^T P Q`` is diagonal, else a MatMul."""
    if isinstance(patch, ScalePatch):
        p = torch.diag(patch.scale.data.double())
    elif isinstance(patch, LinearPatch):
        p = patch.weight.data.double()
    else:
        raise TypeError(f"unknown patch module {type(patch).__name__}")
    rotated = q.T @ p @ q
    diag = torch.diagonal(rotated)
    off = (rotated - torch.diag(diag)).norm() / rotated.norm().clamp_min(1e-300)
    dtype = next(patch.parameters()).dtype
    if off <= DIAGONAL_TOL_EPS * torch.finfo(dtype).eps:
        return ScalePatch(diag.to(dtype))
    return LinearPatch(rotated.to(dtype))


@torch.no_grad()
def rotate_model(model: Any, adapter: ModelAdapter) -> bool:
    """Fold norm scales and rotate the stream by H in place; returns whether it untied."""
    q = hadamard_matrix(adapter.hidden_size, dtype=torch.float64)
    untied = adapter.tied_embeddings
    if untied:
        untie_embeddings(model, adapter)
    emb = adapter.embeddings.weight
    _set(emb, emb.data.double() @ q.to(emb.device))
    for layer in adapter.layers:
        _fold_layer(adapter.layer_adapter(layer), q)
    _fold_readers([adapter.lm_head], _reset_norm(_unwrapped_final_norm(adapter)), q)
    for pos, patch in installed_patches(adapter).items():
        set_patch(adapter, pos, _rotate_patch(patch, q))
    return untied


def _patch_kinds(adapter: ModelAdapter) -> set[str]:
    return {type(p).__name__ for p in installed_patches(adapter).values()}


def _rotation_reason(adapter: ModelAdapter, rotate: bool) -> str | None:
    """None when the residual stream is to be rotated, else why not."""
    kinds = _patch_kinds(adapter)
    if not rotate:
        if not kinds:
            return "rotation disabled (--no-rotate)"
        return "rotation disabled (--no-rotate): the patch stays one explicit MatMul"
    if kinds and "LinearPatch" not in kinds:
        return "no d x d patch to fold: diag patches are per-channel multiplies already"
    blockers = fold_blockers(adapter)
    return ("cannot fold exactly: " + "; ".join(blockers)) if blockers else None


def online_hadamard_blocker(adapter: ModelAdapter) -> str | None:
    """Why the down_proj inputs cannot get an online Hadamard transform (None: they can)."""
    outputs = [adapter.layer_adapter(layer).mlp_output for layer in adapter.layers]
    linears = [p for p in outputs if isinstance(p, nn.Linear)]
    if len(linears) != len(outputs):
        return "the MLP output is not one nn.Linear (fused experts)"
    bad = sorted({p.in_features for p in linears if not is_supported(p.in_features)})
    return f"no Hadamard matrix of size {bad[0]} (down_proj input)" if bad else None


@torch.no_grad()
def add_online_hadamard(model: nn.Module, adapter: ModelAdapter) -> None:
    """Every layer's ``down_proj`` reads ``x H`` and its weight becomes ``W H`` (exact:
    ``x H H^T W^T = x W^T``); ``H`` spreads the activation outliers of its input."""
    for layer in adapter.layers:
        lin = adapter.layer_adapter(layer).mlp_output
        assert isinstance(lin, nn.Linear)  # online_hadamard_blocker checked it
        if isinstance(lin, HadamardInputLinear):
            raise VerificationError("the model has an online Hadamard transform already")
        h = hadamard_matrix(lin.in_features, dtype=torch.float64)
        _set(lin.weight, lin.weight.data.double() @ h.to(lin.weight.device))
    install_online_hadamard(model, adapter)


def fold_model(model: Any, rotate: bool = True, online_hadamard: bool = False) -> FoldReport:
    """Fold in place where exact; otherwise leave the model as it is and say why. A model
    without patches (dense) is rotated too. ``online_hadamard``: see
    :func:`add_online_hadamard`."""
    adapter = get_adapter(model)
    before = count_params(model)
    reason = _rotation_reason(adapter, rotate)
    if online_hadamard and (blocker := online_hadamard_blocker(adapter)):
        raise VerificationError(f"--online-hadamard: {blocker}; nothing was written")
    untied = False
    if reason is None:
        untied = rotate_model(model, adapter)
    else:
        log.warning("fold: %s", reason)
    if online_hadamard:
        add_online_hadamard(model, adapter)
    return FoldReport(
        mode="unrotated" if reason else "rotated",
        reason=reason,
        untied_embeddings=untied,
        params_before=before,
        params_after=count_params(model),
        patch_ops=count_patch_ops(adapter),
        online_hadamard=online_hadamard,
    )


@torch.no_grad()
def compare_logits(a: nn.Module, b: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    """(max |logit diff|, that divided by max |logit|) over ``windows``."""
    max_abs, max_ref = 0.0, 0.0
    for row in windows:
        ids = row.unsqueeze(0)
        la = a(input_ids=ids, use_cache=False).logits.double()
        lb = b(input_ids=ids, use_cache=False).logits.double()
        max_abs = max(max_abs, float((la - lb).abs().max()))
        max_ref = max(max_ref, float(la.abs().max()))
    return max_abs, max_abs / max(max_ref, 1e-30)


def _verify(
    reference: nn.Module, folded: nn.Module, windows: torch.Tensor, tol: float
) -> tuple[float, float]:
    max_abs, rel = compare_logits(reference, folded, windows)
    if rel > tol:
        raise VerificationError(
            f"folded model differs from the unfolded one: max |logit diff| {max_abs:.3e} "
            f"({rel:.3e} of max |logit|) > tolerance {tol:.1e}; nothing was written"
        )
    return max_abs, rel


@dataclass
class FoldResult:
    """The folded model, what the fold did, and where it was written."""

    model: LoadedModel
    report: FoldReport
    out: Path | None = None


def default_verify_spec(meta: dict[str, Any]) -> CalibrationSpec:
    """The checkpoint's calibration data and text field, 4 windows of 256 tokens (seed 1)."""
    recorded = CalibrationSpec.from_dict(meta.get("calibration") or {})
    return dataclasses.replace(
        recorded, samples=VERIFY_SAMPLES, seqlen=VERIFY_SEQLEN, seed=VERIFY_SEED
    )


def run_fold(cfg: FoldConfig) -> FoldResult:
    """Load a patched checkpoint, fold it, verify against the unfolded model, save."""
    if cfg.out is not None:
        check_out(cfg.out, Kind.CHECKPOINT, cfg.overwrite)
    source = load_model(cfg.patched)
    folded_model = copy.deepcopy(source.model)
    report = fold_model(folded_model, rotate=cfg.rotate, online_hadamard=cfg.online_hadamard)
    spec = cfg.verify or default_verify_spec(source.meta)
    windows = spec.windows(source.tokenizer)
    report.max_abs_diff, report.max_rel_diff = _verify(
        source.model, folded_model, windows, cfg.tolerance
    )
    fold = {**asdict(report), "tolerance": cfg.tolerance, "verified_on": spec.to_dict()}
    meta = {k: v for k, v in source.meta.items() if k != "patches"}
    folded = LoadedModel(folded_model, source.tokenizer, {**meta, "fold": fold}, source.source)
    if cfg.out is not None:
        extra = {"fold_report.json": asdict(report)}
        save_patched(folded, cfg.out, extra=extra, overwrite=cfg.overwrite)
    return FoldResult(folded, report, cfg.out)
