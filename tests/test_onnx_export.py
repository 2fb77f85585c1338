"""ONNX export: graph layout, one patch op per gap, validation against PyTorch, bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import build_tokenizer, make_tiny_model
from onnx import numpy_helper

from lp_deploy.adapters import get_adapter
from lp_deploy.checkpoint import save_patched
from lp_deploy.cli import main
from lp_deploy.errors import (
    LpDeployError,
    ModelSourceError,
    OutputExistsError,
    VerificationError,
)
from lp_deploy.exporters import onnx as onnx_export
from lp_deploy.exporters.onnx import (
    OnnxExportConfig,
    export_onnx,
    external_data_locations,
    read_report,
    tolerances,
)
from lp_deploy.model import LoadedModel
from lp_deploy.modules import LinearPatch, ScalePatch
from lp_deploy.prune import apply_plan
from lp_deploy.selection import make_plan

HIDDEN = 64


def make_checkpoint(
    out: Path, kind: str = "linear", removed: tuple[int, ...] = (1, 2, 4), tied: bool = False
) -> Path:
    """A 6-layer tiny Llama with one patch per gap (LinearPatch or ScalePatch), saved."""
    model = make_tiny_model("llama", tied=tied, num_layers=6, sliding=False)
    if tied:
        # above onnxscript's constant-folding limit (8192 elements), like any real embedding;
        # below it the exporter stores a folded transposed copy for the lm_head MatMul
        model.resize_token_embeddings(160)
    plan = make_plan(6, list(removed), "manual")
    gen = torch.Generator().manual_seed(7)
    patches: dict[Any, torch.nn.Module] = {}
    for gap in plan.gaps:
        if kind == "linear":
            patches[gap] = LinearPatch(
                torch.eye(HIDDEN) + 0.05 * torch.randn(HIDDEN, HIDDEN, generator=gen)
            )
        else:
            patches[gap] = ScalePatch(1.0 + 0.2 * torch.randn(HIDDEN, generator=gen))
    apply_plan(get_adapter(model), plan, patches)
    meta = {"plan": plan.to_dict(), "patch": {"kind": kind}}
    return save_patched(LoadedModel(model, build_tokenizer(), meta), out)


def patch_tensors(ckpt: Path) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    return [v for k, v in sorted(state.items()) if k.startswith("lp_deploy.patch.")]


def load_graph(export_dir: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(export_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return model, inits


def nodes_using(
    model: onnx.ModelProto, inits: dict[str, np.ndarray], op: str, tensor: np.ndarray
) -> int:
    """Number of ``op`` nodes with an initializer input equal to ``tensor``."""
    count = 0
    for node in model.graph.node:
        if node.op_type != op:
            continue
        for name in node.input:
            value = inits.get(name)
            if value is not None and value.shape == tensor.shape and np.array_equal(value, tensor):
                count += 1
    return count


def leftovers(parent: Path) -> list[str]:
    """Temporary export dirs left beside ``out``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def linear_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lin") / "ckpt")


@pytest.fixture(scope="module")
def linear_export(linear_ckpt: Path) -> Path:
    return export_onnx(
        OnnxExportConfig(model=str(linear_ckpt), out=linear_ckpt.parent / "onnx")
    ).out


@pytest.fixture(scope="module")
def scale_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # gaps [2, 4) and [5, 6): the second patch sits in front of the final norm
    return make_checkpoint(
        tmp_path_factory.mktemp("scale") / "ckpt", "scale", removed=(2, 3, 5), tied=True
    )


@pytest.fixture(scope="module")
def scale_export(scale_ckpt: Path) -> Path:
    cfg = OnnxExportConfig(
        model=str(scale_ckpt), out=scale_ckpt.parent / "onnx", external_data=True
    )
    return export_onnx(cfg).out


# --------------------------------------------------------------------------- layout


def test_export_files_names_and_dims(linear_export: Path) -> None:
    names = {p.name for p in linear_export.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "export.json"} <= names
    assert "tokenizer.json" in names
    model = onnx.load(str(linear_export / "model.onnx"), load_external_data=False)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.2.value"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"][:2] == ["batch_size", "sequence_length"]
    assert [v.name for v in model.graph.output][:3] == [
        "logits",
        "present.0.key",
        "present.0.value",
    ]
    assert len(model.graph.input) == 3 + 2 * 3
    meta = json.loads({p.key: p.value for p in model.metadata_props}["lp_deploy"])
    assert meta["export"]["num_layers"] == 3 and meta["plan"]["removed"] == [1, 2, 4]
    config = json.loads((linear_export / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["lp_deploy"]["export"]["dtype"] == "fp32"
    assert config["lp_deploy"]["plan"]["gaps"] == [[1, 3], [4, 5]]


def test_validation_report_within_fp32_tolerance(linear_export: Path) -> None:
    v = read_report(linear_export)["validation"]
    assert v["passed"] and v["tolerance"] == 1e-3
    assert v["text"].endswith("test.txt") or "paragraph" in v["text"]
    assert v["prefill_tokens"] == 128 and v["decode_steps"] == 8
    for key in ("prefill_logits", "decode_logits", "padded_batch_logits", "present_kv"):
        assert 0 <= v[key] <= 1e-3, key


def test_one_patch_matmul_per_gap(linear_ckpt: Path, linear_export: Path) -> None:
    model, inits = load_graph(linear_export)
    patches = patch_tensors(linear_ckpt)
    assert len(patches) == 2
    for patch in patches:
        assert patch.shape == (HIDDEN, HIDDEN)
        assert nodes_using(model, inits, "MatMul", patch) == 1
    square = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and any(any(np.array_equal(inits.get(i, np.empty(0)), p) for p in patches) for i in n.input)
    ]
    assert len(square) == 2


def test_one_scale_mul_per_gap_and_tied_weights_once(scale_ckpt: Path, scale_export: Path) -> None:
    model, inits = load_graph(scale_export)
    patches = patch_tensors(scale_ckpt)
    assert len(patches) == 2
    for patch in patches:
        assert patch.shape == (HIDDEN,)
        assert nodes_using(model, inits, "Mul", patch) == 1
        assert nodes_using(model, inits, "MatMul", patch) == 0
    from safetensors.numpy import load_file

    embed = load_file(str(scale_ckpt / "model.safetensors"))["model.embed_tokens.weight"]
    copies = [
        k
        for k, v in inits.items()
        if np.array_equal(v, embed) or (v.ndim == 2 and np.array_equal(v, embed.T))
    ]
    assert len(copies) == 1, copies  # tied embedding / lm_head stored once
    assert (scale_export / "model.onnx.data").is_file()  # external_data=True
    assert read_report(scale_export)["validation"]["passed"]


def test_folded_checkpoint_exports_per_channel_mul(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from lp_deploy.fold import FoldConfig, run_fold

    folded = tmp_path / "folded"
    run_fold(FoldConfig(patched=tiny_checkpoint, out=folded, progress=False))
    out = export_onnx(
        OnnxExportConfig(model=str(folded), out=tmp_path / "onnx", decode_steps=2)
    ).out
    model, inits = load_graph(out)
    patches = patch_tensors(folded)
    assert patches and all(p.ndim == 1 for p in patches)
    for patch in patches:
        assert nodes_using(model, inits, "Mul", patch) == 1
    assert read_report(out)["validation"]["passed"]


# --------------------------------------------------------------------------- options


def test_default_export_norms_fuse_in_onnx_runtime(linear_export: Path, tmp_path: Path) -> None:
    """RMSNorm's rsqrt is written as Sqrt -> Div (not Sqrt -> Reciprocal -> Mul), so ONNX
    Runtime's SimplifiedLayerNormalization fusion fires at session load on the default export
    (3 layers x 2 norms + the final one)."""
    import onnxruntime as ort

    report = read_report(linear_export)
    assert report["optimize"] == 0 and report["fusions"]["rsqrt_as_div"] == 7
    # the exporter's intermediate shapes are dropped (ONNX Runtime ran slower with them)
    assert report["value_info_dropped"] > 100 and "value_info_dropped" not in report["fusions"]
    assert not onnx.load(str(linear_export / "model.onnx")).graph.value_info
    assert report["validation"]["passed"]
    stored = Counter(n.op_type for n in onnx.load(str(linear_export / "model.onnx")).graph.node)
    assert stored["Reciprocal"] == 0 and stored["Div"] >= 7
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(
        str(linear_export / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    ran = Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
    assert ran["SimplifiedLayerNormalization"] + ran["SkipSimplifiedLayerNormalization"] == 7
    assert ran["Sqrt"] == 0


def test_optimize_applies_fusions_and_validates(linear_ckpt: Path, tmp_path: Path) -> None:
    """--optimize 2 on an export with external data (the path of graphs above 2 GB): one data
    file beside the graph, every external initializer in it, validated."""
    cfg = OnnxExportConfig(
        model=str(linear_ckpt), out=tmp_path / "opt", optimize=2, decode_steps=4, external_data=True
    )
    out = export_onnx(cfg).out
    assert sorted(p.name for p in out.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert external_data_locations(out / "model.onnx") == {"model.onnx.data"}
    report = read_report(out)
    assert report["optimize"] == 2 and report["external_data"]
    assert report["fusions"].get("skip_rms_normalization", 0) > 0
    assert report["validation"]["passed"]
    model, inits = load_graph(out)
    assert any(n.domain == "com.microsoft" for n in model.graph.node)
    for patch in patch_tensors(linear_ckpt):
        users = nodes_using(model, inits, "MatMul", patch) + nodes_using(
            model, inits, "FusedMatMul", patch
        )
        assert users == 1


def test_fp16_export_via_cli(
    linear_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fp16"
    code = main(["-q", "export", "onnx", str(linear_ckpt), "--out", str(out), "--dtype", "fp16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validated on 128+8 tokens" in printed and f"wrote {out}" in printed
    v = read_report(out)["validation"]
    assert v["passed"] and v["reference_lowp"] is not None
    assert v["tolerance"] >= 0.005 * v["logit_scale"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_tolerances_per_dtype() -> None:
    assert tolerances("fp32", 20.0, 5.0) == (1e-3, 1e-3)
    assert tolerances("fp16", 20.0, 5.0) == pytest.approx((0.2, 0.05))
    budget = {
        "prefill_logits": 0.05,
        "decode_logits": 0.02,
        "padded_batch_logits": 0.01,
        "present_kv": 0.01,
    }
    assert tolerances("fp16", 20.0, 5.0, budget) == pytest.approx((0.1, 0.025))


# --------------------------------------------------------------------------- bad inputs


def test_not_a_model_dir(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        export_onnx(OnnxExportConfig(model=str(junk), out=out))
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_reports_bad_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-q", "export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "lp-deploy export: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unsupported_dtype(linear_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(LpDeployError, match="unsupported dtype 'int8'"):
        export_onnx(OnnxExportConfig(model=str(linear_ckpt), out=tmp_path / "o", dtype="int8"))
    with pytest.raises(LpDeployError, match="bf16"):
        export_onnx(OnnxExportConfig(model=str(linear_ckpt), out=tmp_path / "o", dtype="bf16"))
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_refuses_to_replace_a_non_export_dir(linear_ckpt: Path, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"data\.txt.*--overwrite"):
        export_onnx(OnnxExportConfig(model=str(linear_ckpt), out=keep))
    assert (keep / "data.txt").read_text() == "precious"
    with pytest.raises(OutputExistsError, match="is an lp-deploy checkpoint"):
        export_onnx(OnnxExportConfig(model=str(linear_ckpt), out=linear_ckpt))


def test_failed_validation_leaves_nothing(
    linear_ckpt: Path, linear_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupted patch weight in the graph: VerificationError with the measured difference,
    no temporary files, and the previous export at ``out`` untouched."""
    import shutil

    import onnx_ir as ir

    original = onnx_export.name_total_dims

    def corrupt(model: Any) -> None:
        original(model)
        value = next(v for k, v in model.graph.initializers.items() if k.endswith("patch.weight"))
        value.const_value = ir.tensor(value.const_value.numpy() * 1.5)

    monkeypatch.setattr(onnx_export, "name_total_dims", corrupt)
    out = tmp_path / "prev"
    shutil.copytree(linear_export, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(VerificationError, match=r"max \|logit diff\| prefill \d") as err:
        export_onnx(OnnxExportConfig(model=str(linear_ckpt), out=out, decode_steps=2))
    assert "Nothing was written" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- ecosystem

COMPAT_PYTHON = Path(__file__).resolve().parents[1] / ".venv-compat" / "bin" / "python"
CHECK_OPTIMUM = Path(__file__).resolve().parent / "compat" / "check_optimum.py"


@pytest.mark.skipif(
    not COMPAT_PYTHON.is_file(),
    reason="compat environment .venv-compat (transformers==4.57.6 + optimum-onnx) is not built; "
    "see tests/compat/check_optimum.py",
)
def test_optimum_ort_model_generates_same_tokens(linear_export: Path) -> None:
    import subprocess

    from lp_deploy.runtimes.ort_runtime import OrtRuntime

    rt = OrtRuntime(linear_export)
    prompt = rt.encode("the city of the river was built in the early year")
    expected = rt.generate(prompt, max_new_tokens=32)
    cmd = [
        str(COMPAT_PYTHON),
        str(CHECK_OPTIMUM),
        str(linear_export),
        "--prompt-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "32",
        "--expected",
        ",".join(map(str, expected)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"tokens": expected, "match": True}


# --------------------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def smol_patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M, 5 of 30 layers pruned, rotate patch (unfolded)."""
    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.pipeline import PatchConfig, run_patch

    out = tmp_path_factory.mktemp("smol") / "patched"
    spec = CalibrationSpec(samples=4, seqlen=128)
    cfg = PatchConfig(model="smollm2-135m", prune=5, calibration=spec, out=out, progress=False)
    try:
        run_patch(cfg)
    except ModelSourceError as exc:
        pytest.skip(f"SmolLM2-135M is not cached and cannot be downloaded: {exc}")
    return out


def _compare_on_wikitext(
    ort_rt: Any, ref: Any, prefill: int = 128, steps: int = 32
) -> tuple[float, float]:
    """Max |logit diff| over a prefill of real text and teacher-forced decode steps."""
    ids, _ = onnx_export.validation_ids(ref.tokenizer, None, prefill + steps)
    diffs = []
    pasts: list[Any] = [None, None]
    for k, chunk in enumerate([ids[:prefill], *ids[prefill:].split(1)]):
        start = 0 if k == 0 else prefill + k - 1
        n = chunk.numel()
        mask = torch.ones(1, start + n, dtype=torch.long)
        pos = torch.arange(start, start + n)[None]
        outs = [rt.forward(chunk[None], mask, pos, pasts[i]) for i, rt in enumerate((ort_rt, ref))]
        pasts = [o[1] for o in outs]
        diffs.append(float((outs[0][0] - outs[1][0]).abs().max()))
    return diffs[0], max(diffs[1:])


@pytest.mark.slow
def test_smollm2_fp32_matches_torch(smol_patched: Path, tmp_path: Path) -> None:
    from lp_deploy.runtimes.ort_runtime import OrtRuntime
    from lp_deploy.runtimes.torch_runtime import TorchRuntime

    out = export_onnx(OnnxExportConfig(model=str(smol_patched), out=tmp_path / "fp32")).out
    assert read_report(out)["validation"]["passed"]
    ort_rt, ref = OrtRuntime(out), TorchRuntime.from_artifact(smol_patched)
    prefill_diff, decode_diff = _compare_on_wikitext(ort_rt, ref)
    assert prefill_diff <= 1e-3 and decode_diff <= 1e-3, (prefill_diff, decode_diff)
    prompt, _ = onnx_export.validation_ids(ref.tokenizer, None, 128)
    greedy = ref.generate(prompt, max_new_tokens=32, stop_token_ids=[])
    assert ort_rt.generate(prompt, max_new_tokens=32, stop_token_ids=[]) == greedy
    model, inits = load_graph(out)
    [patch] = patch_tensors(smol_patched)
    assert patch.shape == (576, 576) and nodes_using(model, inits, "MatMul", patch) == 1


@pytest.mark.slow
def test_smollm2_fp16_greedy_identical(smol_patched: Path, tmp_path: Path) -> None:
    from lp_deploy.runtimes.ort_runtime import OrtRuntime
    from lp_deploy.runtimes.torch_runtime import TorchRuntime

    out = export_onnx(
        OnnxExportConfig(model=str(smol_patched), out=tmp_path / "fp16", dtype="fp16")
    ).out
    v = read_report(out)["validation"]
    assert v["passed"] and v["tolerance"] < 0.05 * v["logit_scale"]
    ort_rt, ref = OrtRuntime(out), TorchRuntime.from_artifact(smol_patched)
    prompt, _ = onnx_export.validation_ids(ref.tokenizer, None, 128)
    greedy = ref.generate(prompt, max_new_tokens=32, stop_token_ids=[])
    assert ort_rt.generate(prompt, max_new_tokens=32, stop_token_ids=[]) == greedy
