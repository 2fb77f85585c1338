"""TensorRT path: what can be checked without TensorRT (profiles, errors); the build is skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError
from lp_deploy.exporters.tensorrt import (
    TensorRTConfig,
    build_engine,
    dim_ranges,
    graph_inputs,
    profile_shapes,
)


def fake_export(path: Path, layers: int = 2, kv_heads: int = 3, head_dim: int = 64) -> Path:
    """A directory whose model.onnx has the exporter's inputs and named dims (no real graph)."""
    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, t]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s]),
    ]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [b, kv_heads, p, head_dim]
                )
            )
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, [b, s])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])], "g", inputs, [out]
    )
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path / "model.onnx"))
    return path


def test_profile_shapes_from_graph_inputs(tmp_path: Path) -> None:
    export = fake_export(tmp_path / "onnx")
    cfg = TensorRTConfig(onnx_dir=export, max_batch=8, max_seq=256, max_past=768, opt_past=128)
    shapes = profile_shapes(export / "model.onnx", cfg)
    assert len(shapes) == 3 + 2 * 2
    assert shapes["input_ids"] == ((1, 1), (1, 1), (8, 256))
    assert shapes["attention_mask"] == ((1, 1), (1, 129), (8, 1024))
    assert shapes["position_ids"] == shapes["input_ids"]
    assert shapes["past_key_values.1.value"] == ((1, 3, 0, 64), (1, 3, 128, 64), (8, 3, 768, 64))
    assert graph_inputs(export / "model.onnx")["past_key_values.0.key"] == [
        "batch_size",
        3,
        "past_sequence_length",
        64,
    ]


def test_profile_rejects_unknown_dims_and_bad_ranges(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["mystery", 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["mystery", 4])],
    )
    onnx.save(helper.make_model(graph), str(path / "model.onnx"))
    with pytest.raises(LpDeployError, match="mystery"):
        profile_shapes(path / "model.onnx", TensorRTConfig(onnx_dir=path))
    with pytest.raises(LpDeployError, match="opt_batch"):
        dim_ranges(TensorRTConfig(onnx_dir=path, opt_batch=5, max_batch=4))
    with pytest.raises(LpDeployError, match="opt_past"):
        dim_ranges(TensorRTConfig(onnx_dir=path, opt_past=-1))


def test_missing_tensorrt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = fake_export(tmp_path / "onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(LpDeployError, match=r"TensorRT is not installed: pip install tensorrt"):
        build_engine(TensorRTConfig(onnx_dir=export))
    assert sorted(p.name for p in export.iterdir()) == ["model.onnx"]


def test_build_needs_an_onnx_export(tmp_path: Path) -> None:
    with pytest.raises(LpDeployError, match=r"has no model\.onnx"):
        build_engine(TensorRTConfig(onnx_dir=tmp_path))


def test_cli_export_tensorrt_reports_missing_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    export = fake_export(tmp_path / "onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["-q", "export", "tensorrt", str(export)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(
    not _has_tensorrt(),
    reason="TensorRT is not installed: pip install tensorrt (NVIDIA package index) on a machine "
    "with an NVIDIA GPU; not installable here, in CI, or on the lent GPU machine",
)
def test_build_engine_from_tiny_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx

    export = export_onnx(OnnxExportConfig(model=str(tiny_model_dir), out=tmp_path / "onnx")).out
    engine = build_engine(TensorRTConfig(onnx_dir=export, max_seq=64, max_past=64))
    assert engine.is_file() and engine.stat().st_size > 0
