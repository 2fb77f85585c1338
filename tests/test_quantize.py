"""Quantized ONNX exports (int8 dynamic, int4 MatMulNBits): graph, IO, validation, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from conftest import build_tokenizer, make_tiny_model, save_model_dir

from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError, VerificationError
from lp_deploy.exporters import quantize
from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report
from lp_deploy.exporters.quantize import QuantizeConfig, QuantReport, quantize_export
from lp_deploy.perplexity import LogitsFn

# random tiny models have near-flat logits (perplexity ~500 over 128 words): loose limits
LIMITS = {"max_ppl_increase": 0.5, "min_agreement": 0.2}


def io_signature(export_dir: Path) -> list[tuple[str, int, list[str | int]]]:
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*model.graph.input, *model.graph.output]
    ]


def op_counts(export_dir: Path) -> dict[str, int]:
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qdense") / "model"
    return save_model_dir(make_tiny_model("llama", num_layers=2), build_tokenizer(), path)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import synthetic_text

    path = tmp_path_factory.mktemp("qtext") / "text.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="module")
def fp32_export(dense_dir: Path) -> Path:
    cfg = OnnxExportConfig(model=str(dense_dir), out=dense_dir.parent / "fp32", decode_steps=2)
    return export_onnx(cfg).out


def quant_config(text: Path, **options: Any) -> QuantizeConfig:
    return QuantizeConfig(text=str(text), windows=4, seqlen=64, **{**LIMITS, **options})


def quantized_copy(fp32: Path, out: Path, cfg: QuantizeConfig) -> tuple[Path, QuantReport]:
    """The fp32 export copied to ``out`` and quantized there (what export_onnx does last)."""
    shutil.copytree(fp32, out)
    return out, quantize_export(out, cfg, build_tokenizer())


@pytest.fixture(scope="module")
def int8_export(fp32_export: Path, text: Path) -> tuple[Path, QuantReport]:
    """The fp32 export quantized as it is (no new trace)."""
    q = quant_config(text, mode="int8")
    result = export_onnx(
        OnnxExportConfig(model=str(fp32_export), out=fp32_export.parent / "int8", quantize=q)
    )
    assert result.report.quantization is not None
    return result.out, result.report.quantization


def test_int8_graph_keeps_io_and_validates(
    int8_export: tuple[Path, QuantReport], fp32_export: Path
) -> None:
    out, q = int8_export
    assert io_signature(out) == io_signature(fp32_export)
    assert op_counts(out).get("MatMulNBits", 0) == q.quantized == 15
    assert {a["bits"] for a in nbits_attributes(out)} == {8}
    assert not any(p.name.startswith(".fp32") for p in out.iterdir())
    assert (q.mode, q.method, q.bits, q.block_size, q.accuracy_level) == ("int8", "block", 8, 32, 4)
    assert q.per_channel is None
    assert q.onnx_bytes < q.fp32_bytes and q.excluded == []
    v = q.validation
    assert v is not None and v.passed and v.windows == 4 and v.seqlen == 64
    assert v.perplexity_increase == pytest.approx(v.perplexity / v.fp32_perplexity - 1)
    assert 0.2 <= v.token_agreement <= 1.0
    report = read_report(out)
    assert report["quantized_from"] == str(fp32_export) and report["validation"]["passed"]
    assert report["quantization"]["validation"]["perplexity"] == v.perplexity
    assert report["onnx_bytes"] == q.onnx_bytes
    meta = json.loads((out / "config.json").read_text())["lp_deploy"]["export"]
    assert meta["quantization"] == {
        "mode": "int8",
        "exclude": [],
        "method": "block",
        "block_size": 32,
        "accuracy_level": 4,
    }
    again = OnnxExportConfig(model=str(out), out=out.parent / "twice", quantize=q_int4())
    with pytest.raises(LpDeployError, match="is not an fp32 export"):
        export_onnx(again)


def nbits_attributes(export_dir: Path) -> list[dict[str, Any]]:
    model = onnx.load(str(export_dir / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]


def test_int8_dynamic(fp32_export: Path, text: Path, tmp_path: Path) -> None:
    """The other int8 method: per-tensor int8 weights, activations quantized at run time."""
    cfg = quant_config(text, mode="int8", int8_method="dynamic")
    out, q = quantized_copy(fp32_export, tmp_path / "dyn", cfg)
    ops = op_counts(out)
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) == q.quantized == 15
    assert ops.get("MatMulNBits", 0) == 0 and io_signature(out) == io_signature(fp32_export)
    assert (q.method, q.bits, q.block_size, q.accuracy_level, q.per_channel) == (
        "dynamic",
        8,
        None,
        None,
        False,
    )
    assert q.tool == "onnxruntime.quantization.quantize_dynamic"
    assert q.validation is not None and q.validation.passed
    assert not onnx.load(str(out / "model.onnx")).graph.value_info  # its shape inference's


def q_int4() -> QuantizeConfig:
    return QuantizeConfig(mode="int4")


def test_int8_export_runs_in_the_runtime(int8_export: tuple[Path, QuantReport]) -> None:
    from lp_deploy.runtimes.ort_runtime import OrtRuntime

    rt = OrtRuntime(int8_export[0])
    tokens = rt.generate(rt.encode("the city of the river"), max_new_tokens=8)
    assert len(tokens) >= 1


def test_int4_with_exclusions(fp32_export: Path, text: Path, tmp_path: Path) -> None:
    cfg = quant_config(text, mode="int4", block_size=64, exclude=("lm_head",))
    out, q = quantized_copy(fp32_export, tmp_path / "int4", cfg)
    assert q.block_size == 64 and q.accuracy_level == 0 and q.excluded == ["lm_head"]
    assert op_counts(out).get("MatMulNBits", 0) == q.quantized == 2 * 7
    # accuracy level 0 is the operator's default: the quantizer leaves the attribute out
    attrs = nbits_attributes(out)
    assert {(a["block_size"], a["bits"], a.get("accuracy_level", 0)) for a in attrs} == {(64, 4, 0)}
    model = onnx.load(str(out / "model.onnx"))
    assert list(quantize.matmul_weights(model).values()) == ["lm_head"]  # still fp32


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied model's export in the form the exporter gives real sizes: the lm_head MatMul reads
    ``Transpose(embedding)`` (at this size the exporter folds the Transpose into a copy, so the
    test puts it back)."""
    path = tmp_path_factory.mktemp("qtied") / "model"
    save_model_dir(make_tiny_model("llama", tied=True, num_layers=2), build_tokenizer(), path)
    out = export_onnx(OnnxExportConfig(model=str(path), out=path.parent / "fp32")).out
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    table = next(
        n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
    )
    head = next(n for n, m in quantize.matmul_weights(model).items() if m == "lm_head")
    node = next(n for n in model.graph.node if n.name == head)
    folded = onnx.numpy_helper.to_array(inits[node.input[1]])
    assert (folded == onnx.numpy_helper.to_array(inits[table]).T).all()
    model.graph.initializer.remove(inits[node.input[1]])
    at = list(model.graph.node).index(node)
    model.graph.node.insert(
        at, onnx.helper.make_node("Transpose", [table], [node.input[1]], perm=[1, 0])
    )
    onnx.save(model, str(out / "model.onnx"))
    return out


def test_a_tied_lm_head_is_untied_exactly_and_quantized(
    tied_export: Path, text: Path, tmp_path: Path
) -> None:
    """A tied lm_head reads the embedding table through a Transpose, which the quantizer skips:
    it gets its own (exact) copy and is quantized; kept out, it stays tied and fp32."""
    graph = tied_export / "model.onnx"
    model = onnx.load(str(graph))
    assert "lm_head" in quantize.matmul_weights(model).values()  # through the Transpose
    taken = onnx.load(str(graph))  # a name an earlier quantizer pass derived from it is taken
    taken.graph.initializer.append(
        onnx.helper.make_tensor("lm_head.weight_scales", onnx.TensorProto.FLOAT, [1], [0.0])
    )
    assert quantize.untie_transposed(taken, []) == ["lm_head.weight.untied2"]
    assert quantize.untie_transposed(model, []) == ["lm_head.weight"]
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    onnx.save(model, str(tmp_path / "untied.onnx"))
    ids = torch.randint(3, 100, (2, 24))
    tied = quantize.ort_logits_fn(graph)(ids)
    untied = quantize.ort_logits_fn(tmp_path / "untied.onnx")(ids)
    torch.testing.assert_close(untied, tied, rtol=0, atol=1e-6)

    out, q = quantized_copy(tied_export, tmp_path / "int4", quant_config(text, mode="int4"))
    assert q.quantized == op_counts(out)["MatMulNBits"] == 15 and q.excluded == []
    assert quantize.matmul_weights(onnx.load(str(out / "model.onnx"))) == {}  # nothing fp32
    assert q.validation is not None and q.validation.passed

    cfg = quant_config(text, mode="int4", exclude=("lm_head",))
    out, q = quantized_copy(tied_export, tmp_path / "int4-kept", cfg)
    kept = onnx.load(str(out / "model.onnx"))
    assert list(quantize.matmul_weights(kept).values()) == ["lm_head"] and q.quantized == 14
    assert "lm_head.weight" not in {i.name for i in kept.graph.initializer}  # still tied


def test_quantized_graph_stores_no_intermediate_shapes(
    fp32_export: Path, text: Path, tmp_path: Path
) -> None:
    """An fp32 export that carries ``value_info`` (exports before 9ad8ef9 did) is quantized into
    a graph without (ONNX Runtime ran slower with them)."""
    src = tmp_path / "fp32-shapes"
    shutil.copytree(fp32_export, src)
    graph = src / "model.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(graph))), str(graph))
    assert onnx.load(str(graph)).graph.value_info
    out, q = quantized_copy(src, tmp_path / "int4", quant_config(text, mode="int4"))
    assert not onnx.load(str(out / "model.onnx")).graph.value_info
    assert q.validation is not None and q.validation.passed


def test_auto_exclude_keeps_the_most_sensitive_group(
    fp32_export: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan runs on windows after the validation windows (recorded), never on them."""
    seen: dict[str, set[tuple[int, ...]]] = {"scan": set(), "validate": set()}
    phase = ["scan"]
    logits_fn, validate = quantize.ort_logits_fn, quantize.validate_quantized

    def recording(path: Path, threads: int | None = None) -> LogitsFn:
        fn = logits_fn(path, threads)
        return lambda ids: seen[phase[0]].add(tuple(ids[0].tolist())) or fn(ids)

    def validating(*args: Any) -> quantize.QuantValidation:
        phase[0] = "validate"
        return validate(*args)

    monkeypatch.setattr(quantize, "ort_logits_fn", recording)
    monkeypatch.setattr(quantize, "validate_quantized", validating)
    cfg = quant_config(text, mode="int4", block_size=32, auto_exclude=1, scan_windows=1)
    out, q = quantized_copy(fp32_export, tmp_path / "auto", cfg)
    assert len(seen["scan"]) == 1 and len(seen["validate"]) == 4
    assert not seen["scan"] & seen["validate"]
    assert q.scan_data == {"text": str(text), "windows": 1, "seqlen": 64, "first_token": 4 * 64}
    assert q.sensitivity is not None
    assert set(q.sensitivity) == {"model.layers.0", "model.layers.1", "lm_head"}
    worst = max(q.sensitivity, key=lambda g: q.sensitivity[g])  # type: ignore[index]
    assert q.excluded and all(quantize.weight_group(m) == worst for m in q.excluded)
    kept = set(quantize.matmul_weights(onnx.load(str(out / "model.onnx"))).values())
    assert kept == set(q.excluded)
    assert q.quantized == 15 - len(q.excluded)


def test_int4_keeps_the_most_sensitive_kinds_in_int8(
    fp32_export: Path, text: Path, tmp_path: Path
) -> None:
    """--auto-exclude 2 --scan-by kind --fallback int8: the two projection kinds whose int4
    costs the most perplexity (measured) go to block-wise int8, the rest to int4, none fp32."""
    cfg = quant_config(
        text, mode="int4", auto_exclude=2, scan_by="kind", fallback="int8", scan_windows=1
    )
    out, q = quantized_copy(fp32_export, tmp_path / "mixed", cfg)
    kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert q.sensitivity is not None and set(q.sensitivity) == kinds | {"lm_head"}
    worst = sorted(q.sensitivity, key=lambda g: -q.sensitivity[g])[:2]  # type: ignore[index]
    assert {quantize.weight_group(m, "kind") for m in q.excluded} == set(worst)
    bits = [a["bits"] for a in nbits_attributes(out)]
    assert q.fallback == "int8" and len(bits) == q.quantized == 15
    assert bits.count(8) == len(q.excluded) and bits.count(4) == 15 - len(q.excluded)
    assert quantize.matmul_weights(onnx.load(str(out / "model.onnx"))) == {}  # nothing fp32
    assert q.validation is not None and q.validation.passed


def test_auto_exclude_beyond_the_groups_or_the_text_is_refused(
    fp32_export: Path, text: Path, tmp_path: Path
) -> None:
    cfg = quant_config(text, mode="int8", auto_exclude=4)
    with pytest.raises(LpDeployError, match="--auto-exclude 4 is more than the 3 groups"):
        quantized_copy(fp32_export, tmp_path / "many", cfg)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat .\n" * 20)
    cfg = quant_config(short, mode="int8", auto_exclude=1)
    with pytest.raises(LpDeployError, match=r"384 tokens in all, but .*short\.txt has 140"):
        quantized_copy(fp32_export, tmp_path / "short", cfg)


def test_an_export_without_its_tokenizer_is_refused(
    fp32_export: Path, text: Path, tmp_path: Path
) -> None:
    src = tmp_path / "notok"
    shutil.copytree(fp32_export, src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    q = quant_config(text, mode="int8")
    with pytest.raises(LpDeployError, match="has no tokenizer"):
        export_onnx(OnnxExportConfig(model=str(src), out=tmp_path / "q", quantize=q))
    assert not (tmp_path / "q").exists()


def test_failed_validation_leaves_nothing(
    dense_dir: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "compare_on_text", lambda *a: (10.0, 13.0, 0.9))
    q = quant_config(text, mode="int8", max_ppl_increase=None)
    cfg = OnnxExportConfig(model=str(dense_dir), out=tmp_path / "bad", decode_steps=1, quantize=q)
    with pytest.raises(VerificationError, match=r"\+30\.0%, limit \+5\.0%.*Nothing was written"):
        export_onnx(cfg)
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int3"], "unsupported quantization 'int3'; choose one of int8, int4"),
        (["--quantize", "int4", "--block-size", "7"], "block size 7 is not supported"),
        (["--quantize", "int4", "--accuracy-level", "2"], "accuracy level 2"),
        (["--quantize", "int8", "--int8-method", "static"], "unsupported int8 method 'static'"),
        (["--quantize", "int8", "--fallback", "int8"], "--fallback int8 keeps weights out of int4"),
        (["--quantize", "int4", "--scan-by", "row"], "scan_by one of layer, kind"),
        (
            ["--quantize", "int8", "--int8-method", "dynamic", "--accuracy-level", "4"],
            "--accuracy-level applies to block-wise quantization",
        ),
        (["--quantize", "int8", "--dtype", "fp16"], "quantizes an fp32 graph"),
        (["--quantize", "int8", "--min-agreement", "1.5"], "agreement in"),
    ],
)
def test_bad_options_are_refused_early(
    dense_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    out = tmp_path / "o"
    code = main(["-q", "export", "onnx", str(dense_dir), "--out", str(out), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_exclude_that_matches_nothing(fp32_export: Path, text: Path, tmp_path: Path) -> None:
    cfg = quant_config(text, mode="int8", exclude=("nope",))
    with pytest.raises(LpDeployError, match="--exclude 'nope' matches no quantizable weight"):
        quantized_copy(fp32_export, tmp_path / "o", cfg)


def test_exclusion_patterns() -> None:
    weights = {
        "n0": "model.layers.0.mlp.down_proj",
        "n1": "model.layers.1.mlp.down_proj",
        "n2": "model.layers.1.self_attn.o_proj",
        "n3": "lm_head",
        "n4": "model.layers.0.mlp.down_proj.online_hadamard",
    }
    assert set(quantize.excluded_nodes(weights, ["down_proj"])) == {"n0", "n1", "n4"}
    assert set(quantize.excluded_nodes(weights, ["layers.1.*"])) == {"n1", "n2", "n4"}
    assert set(quantize.excluded_nodes(weights, ["lm_head"])) == {"n3", "n4"}
    # a MatMul without name scopes (e.g. rewritten by --optimize) is owned by its initializer
    node = onnx.helper.make_node("MatMul", ["x", "l.0.mlp.down_proj.online_hadamard.cols"], ["y"])
    weights["n5"] = quantize.weight_owner(node, node.input[1])
    assert weights["n5"] == "l.0.mlp.down_proj.online_hadamard.cols"
    assert set(quantize.excluded_nodes(weights, [])) == {"n4", "n5"}  # exact transforms, always


def test_cli_int4_export(
    dense_dir: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = ["-q", "export", "onnx", str(dense_dir), "--out", str(out), "--quantize", "int4"]
    argv += ["--text", str(text), "--quant-windows", "2", "--quant-seqlen", "32"]
    argv += ["--max-ppl-increase", "0.5", "--min-agreement", "0.2", "--accuracy-level", "4"]
    assert main([*argv, "--decode-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "quantized 15 MatMuls to int4 block-wise (block 32, accuracy level 4)" in printed
    assert "vs fp32 on 2 x 32 tokens: perplexity" in printed
    report = read_report(out)
    assert report["validation"]["passed"]  # the fp32 graph against PyTorch, before quantizing
    q = report["quantization"]
    assert q["validation"]["passed"] and report["onnx_bytes"] == q["onnx_bytes"]
    meta = json.loads((out / "config.json").read_text())["lp_deploy"]["export"]
    assert meta["quantization"] == {
        "mode": "int4",
        "exclude": [],
        "method": "block",
        "block_size": 32,
        "accuracy_level": 4,
    }
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------- ecosystem

COMPAT_PYTHON = Path(__file__).resolve().parents[1] / ".venv-compat" / "bin" / "python"
CHECK_OPTIMUM = Path(__file__).resolve().parent / "compat" / "check_optimum.py"


@pytest.mark.skipif(
    not COMPAT_PYTHON.is_file(),
    reason="compat environment .venv-compat (transformers==4.57.6 + optimum-onnx) is not built "
    "(make compat)",
)
def test_optimum_loads_the_int8_export_and_generates(
    int8_export: tuple[Path, QuantReport],
) -> None:
    from lp_deploy.runtimes.ort_runtime import OrtRuntime

    rt = OrtRuntime(int8_export[0])
    prompt = rt.encode("the city of the river was built in the early year")
    expected = rt.generate(prompt, max_new_tokens=16)
    cmd = [str(COMPAT_PYTHON), str(CHECK_OPTIMUM), str(int8_export[0])]
    cmd += ["--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "16"]
    cmd += ["--expected", ",".join(map(str, expected))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"tokens": expected, "match": True}


def test_cli_quantizes_an_existing_export(
    fp32_export: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    argv = ["-q", "export", "onnx", str(fp32_export), "--out", str(out), "--quantize", "int8"]
    argv += ["--text", str(text), "--quant-windows", "2", "--quant-seqlen", "32"]
    assert main([*argv, "--max-ppl-increase", "0.5", "--min-agreement", "0.2"]) == 0
    printed = capsys.readouterr().out
    expected = "quantized 15 MatMuls to int8 block-wise (block 32, accuracy level 4); kept in fp32"
    assert f"{expected}: none" in printed
    assert read_report(out)["quantized_from"] == str(fp32_export)


def test_cli_lists_many_kept_weights_by_kind() -> None:
    from lp_deploy.cli import _modules

    names = [f"model.layers.{i}.mlp.down_proj" for i in range(7)] + ["lm_head"]
    assert _modules(names) == "8 weights (down_proj, lm_head)"
    assert _modules(["lm_head"]) == "lm_head" and _modules([]) == "none"
