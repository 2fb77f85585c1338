"""Least-squares patches (``lstsq``, ``lstsq-mlp``): streamed normal equations against
``torch.linalg.lstsq`` on the materialised activations, the ReplaceMe fold into down_proj,
the layer-0 fallback, and what the checkpoint and the ONNX graph contain."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import ARCHS, build_tokenizer, make_tiny_model
from onnx import numpy_helper

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import load_patched, save_patched
from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
from lp_deploy.fit import lstsq_matrix
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.modules import LinearPatch
from lp_deploy.pipeline import Calibrated, calibrate, mlp_fold_blocker
from lp_deploy.prune import installed_patches
from lp_deploy.selection import Gap, make_plan
from lp_deploy.stats import GramStats, collect_gram

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / ".venv-compat"
COMPAT_PYTHON = COMPAT / "bin" / "python"
CHECK = ROOT / "tests" / "compat" / "check_transformers4.py"
TOL = 1e-4  # |logit| differences between loaders / transformers versions (fp32)


def _windows(n: int = 6, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 120, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _materialise(model: Any, windows: torch.Tensor, layer: int) -> tuple[list[Any], Any]:
    """Every boundary state (hidden_states) and the MLP output of ``layer``, all tokens."""
    mlp: list[torch.Tensor] = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda _m, _a, out: mlp.append(out.detach())
    )
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    handle.remove()
    num_layers = len(model.model.layers)
    # hidden_states[L] is after the final norm in transformers; boundary L is before it
    states = [h.reshape(-1, h.shape[-1]).double() for h in hidden[:num_layers]]
    return states, torch.cat(mlp).reshape(-1, states[0].shape[-1]).double()


def test_streamed_fit_equals_torch_lstsq_on_materialised_activations() -> None:
    model = make_tiny_model("llama", num_layers=6, hidden=32)
    loaded = LoadedModel(model, build_tokenizer())
    windows = _windows()
    requests = [("input", 1, 3), ("input", 2, 5), ("mlp", 2, 4)]
    gram = collect_gram(loaded.adapter, windows, requests, batch_size=4, progress=False)
    states, mlp = _materialise(model, windows, layer=1)
    for site, start, end in requests:
        if site == "input":
            x, y = states[start], states[end]
        else:  # ReplaceMe: MLP output of the layer before, target minus the bypassing residual
            x, y = mlp, states[end] - (states[start] - mlp)
        want = torch.linalg.lstsq(x, y).solution
        got = lstsq_matrix(gram[(site, start, end)])
        assert gram[(site, start, end)].n_tokens == windows.numel()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # the residual of the fit is what least squares promises: orthogonal to X
        assert (x.T @ (x @ got - y)).abs().max() <= 1e-6 * (x.T @ y).abs().max()


def test_ridge_and_memory_do_not_depend_on_the_sample_count() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    acc = GramStats.zeros(16)
    for chunk in range(0, 500, 100):  # streamed in pieces: same sums as all at once
        acc.add(x[chunk : chunk + 100], y[chunk : chunk + 100])
    assert acc.xtx.shape == acc.xty.shape == (16, 16) and acc.n_tokens == 500
    x64, y64 = x.double(), y.double()
    lam = 0.1 * float((x64 * x64).sum()) / 16
    want = torch.linalg.solve(x64.T @ x64 + lam * torch.eye(16, dtype=torch.float64), x64.T @ y64)
    torch.testing.assert_close(lstsq_matrix(acc, ridge=0.1), want, rtol=1e-9, atol=1e-12)


def _calibrated(text_file: Path, arch: str = "llama", num_layers: int = 6) -> Calibrated:
    dense = LoadedModel(
        make_tiny_model(arch, num_layers=num_layers, sliding=False), build_tokenizer()
    )
    return calibrate(dense, CalibrationSpec(str(text_file), samples=4, seqlen=32), progress=False)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lstsq_mlp_is_folded_into_down_proj(text_file: Path) -> None:
    cal = _calibrated(text_file)
    plan = make_plan(6, [2, 3], "manual")
    folded = cal.prune(plan, "lstsq-mlp")
    assert installed_patches(folded.adapter) == {}
    assert folded.meta["patch"]["folded_into_down_proj"] == [1]
    # the same map applied explicitly to the MLP output of layer 1 of the plain pruned model
    plain = cal.prune(plan, "none")
    gram = cal.gram[("mlp", 2, 4)]
    matrix = lstsq_matrix(gram).float()
    down = plain.adapter.layers[1].mlp.down_proj
    handle = down.register_forward_hook(lambda _m, _a, out: out @ matrix)
    ids = _windows(2, 20, seed=3)
    want = _logits(plain.model, ids)
    handle.remove()
    torch.testing.assert_close(_logits(folded.model, ids), want, rtol=0, atol=TOL)
    assert (want - _logits(plain.model, ids)).abs().max() > 100 * TOL  # the map does something


def test_lstsq_mlp_gap_at_layer_zero_falls_back_to_lstsq(text_file: Path) -> None:
    cal = _calibrated(text_file)
    plan = make_plan(6, [0, 1, 4], "manual")  # gaps [0, 2) and [4, 5)
    pruned = cal.prune(plan, "lstsq-mlp")
    record = pruned.meta["patch"]
    assert [f["gap"] for f in record["fallbacks"]] == [[0, 2]]
    assert (
        record["fallbacks"][0]["kind"] == "lstsq" and "layer 0" in record["fallbacks"][0]["reason"]
    )
    patches = installed_patches(pruned.adapter)
    assert list(patches) == [0] and isinstance(patches[0], LinearPatch)
    assert record["folded_into_down_proj"] == [1]  # original layer 3, before the gap [4, 5)


def test_lstsq_patch_is_one_linear_patch_per_gap(text_file: Path) -> None:
    cal = _calibrated(text_file)
    plan = make_plan(6, [1, 2, 4], "manual")
    pruned = cal.prune(plan, "lstsq")
    patches = installed_patches(pruned.adapter)
    assert sorted(patches) == [1, 2] and all(isinstance(p, LinearPatch) for p in patches.values())
    torch.testing.assert_close(
        patches[1].weight.double(), lstsq_matrix(cal.gram[("input", 1, 3)]), rtol=0, atol=1e-5
    )


def _save(cal: Calibrated, kind: str, out: Path) -> Path:
    pruned = cal.prune(make_plan(6, [2, 3], "manual"), kind)
    return save_patched(pruned, out)


def test_lstsq_mlp_checkpoint_is_a_plain_transformers_checkpoint(
    text_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = _save(_calibrated(text_file), "lstsq-mlp", tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["lp_deploy"]["patches"] == []
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = _windows(2, 20, seed=4)
    want = _logits(load_patched(ckpt).model, ids)
    torch.testing.assert_close(_logits(plain, ids), want, rtol=0, atol=TOL)
    if (COMPAT / ".lp-deploy-installed").is_file():  # transformers 4.57 reads it alike
        (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
        cmd = [str(COMPAT_PYTHON), str(CHECK), str(ckpt), str(tmp_path / "ids.json")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        logits4 = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])["logits"])
        assert (logits4 - want).abs().max() <= TOL


def _graph(export: Path) -> tuple[int, list[Any]]:
    """MatMul count and initializers of an export."""
    graph = onnx.load(str(export / "model.onnx")).graph
    inits = [numpy_helper.to_array(i) for i in graph.initializer]
    return sum(node.op_type == "MatMul" for node in graph.node), inits


def _stored(tensor: torch.Tensor, inits: list[Any]) -> bool:
    t = tensor.detach().numpy()
    return any(i.shape == t.shape and np.allclose(i, t, atol=1e-6) for i in inits)


@pytest.mark.heavy  # two exports + validations: minutes on a busy 2-core machine
def test_onnx_graph_lstsq_one_matmul_per_gap_lstsq_mlp_none(
    text_file: Path, tmp_path: Path
) -> None:
    """Two exports of the same one-gap plan, both validated against PyTorch by the exporter:
    ``lstsq`` carries its P (one more MatMul); ``lstsq-mlp`` only a different down_proj."""
    cal = _calibrated(text_file)
    graphs = {}
    for kind in ("lstsq", "lstsq-mlp"):
        ckpt = _save(cal, kind, tmp_path / kind)
        export = export_onnx(OnnxExportConfig(model=str(ckpt), out=tmp_path / f"{kind}-onnx")).out
        validation = read_report(export)["validation"]
        assert validation["passed"] and validation["prefill_logits"] <= validation["tolerance"]
        graphs[kind] = _graph(export)
    assert graphs["lstsq"][0] == graphs["lstsq-mlp"][0] + 1  # the one gap's MatMul
    patch = installed_patches(load_model(tmp_path / "lstsq").adapter)[2]
    assert _stored(patch.weight, graphs["lstsq"][1])
    assert not _stored(patch.weight, graphs["lstsq-mlp"][1])
    folded = load_model(tmp_path / "lstsq-mlp").adapter.layers[1].mlp.down_proj.weight
    plain = cal.dense.adapter.layers[1].mlp.down_proj.weight
    assert not torch.allclose(folded, plain)  # the map went into the weights the graph holds
    assert _stored(folded, graphs["lstsq-mlp"][1]) or _stored(folded.T, graphs["lstsq-mlp"][1])


def test_gap_helper_rejects_a_fold_without_a_layer_before() -> None:
    from lp_deploy.prune import fold_mlp_maps

    model = LoadedModel(make_tiny_model("llama", num_layers=4), build_tokenizer())
    with pytest.raises(ValueError, match="no layer before"):
        fold_mlp_maps(model.adapter, make_plan(4, [0], "manual"), {Gap(0, 1): torch.eye(64)})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lstsq_mlp_on_every_architecture_folds_exactly_or_falls_back(
    arch: str, text_file: Path
) -> None:
    """Where the MLP output joins the stream as it is, the folded down_proj equals applying
    the map to it; where it does not (Gemma/OLMo-2 post-norms, Granite's multiplier, experts),
    the gap gets ``lstsq`` and says why."""
    cal = _calibrated(text_file, arch=arch, num_layers=4)
    plan = make_plan(4, [2], "manual")
    pruned = cal.prune(plan, "lstsq-mlp")
    blocker = mlp_fold_blocker(cal.dense.adapter, Gap(2, 3))
    if blocker is not None:
        (fallback,) = pruned.meta["patch"]["fallbacks"]
        assert fallback["kind"] == "lstsq" and blocker in fallback["reason"]
        assert isinstance(installed_patches(pruned.adapter)[2], LinearPatch)
        return
    assert installed_patches(pruned.adapter) == {}
    plain = cal.prune(plan, "none")
    matrix = lstsq_matrix(cal.gram[("mlp", 2, 3)]).float()
    down = plain.adapter.layer_adapter(plain.adapter.layers[1]).mlp_output
    handle = down.register_forward_hook(lambda _m, _a, out: out @ matrix)
    ids = _windows(2, 20, seed=5)
    want = _logits(plain.model, ids)
    handle.remove()
    torch.testing.assert_close(_logits(pruned.model, ids), want, rtol=0, atol=TOL)
