"""``triton build``: the model repository, its configs against Triton's schema and the graph."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'lp-deploy[triton]'")

from lp_deploy.artifacts import MANIFEST_FILE, ONNX_FILE, Kind, dir_kind
from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError, OutputExistsError
from lp_deploy.serving.model_config import (
    GENERATE_INPUTS,
    check_generate_config,
    check_graph_config,
    parse_config,
    read_graph_io,
)
from lp_deploy.serving.triton_repo import TritonRepoConfig, build_repo


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "models"
    engine = out.parent / "fake.plan"
    engine.write_bytes(b"not a real engine")  # only copied; its config is checked vs the graph
    build_repo(TritonRepoConfig(tiny_export, out, name="tiny", max_batch=4, engine=engine))
    return out


def test_layout_and_manifest(repo: Path) -> None:
    files = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    for f in (
        "README.md",
        MANIFEST_FILE,
        "tiny/config.pbtxt",
        "tiny/1/model.py",
        "tiny/1/export/model.onnx",
        "tiny/1/export/config.json",
        "tiny_onnx/config.pbtxt",
        "tiny_onnx/1/model.onnx",
        "tiny_trt/config.pbtxt",
        "tiny_trt/1/model.plan",
    ):
        assert f in files, f
    assert dir_kind(repo) == Kind.TRITON_REPO
    assert (
        "from lp_deploy.serving.python_model import TritonPythonModel"
        in (repo / "tiny/1/model.py").read_text()
    )


def test_generate_config_is_the_generate_interface(repo: Path) -> None:
    text = (repo / "tiny/config.pbtxt").read_text()
    cfg = check_generate_config(text, "tiny")
    assert cfg.model_transaction_policy.decoupled and cfg.backend == "python"
    optional = {i.name for i in cfg.input if i.optional}
    assert optional == {n for n, _, _, opt in GENERATE_INPUTS if opt}
    assert {o.name for o in cfg.output} == {"text_output", "token_ids"}
    assert cfg.parameters["max_batch"].string_value == "4"
    assert cfg.instance_group[0].count == 1


@pytest.mark.parametrize(
    ("model", "platform"), [("tiny_onnx", "onnxruntime_onnx"), ("tiny_trt", "tensorrt_plan")]
)
def test_graph_configs_match_the_graph(
    repo: Path, tiny_export: Path, model: str, platform: str
) -> None:
    io = read_graph_io(tiny_export / ONNX_FILE)
    cfg = check_graph_config((repo / model / "config.pbtxt").read_text(), io, model)
    assert cfg.platform == platform and cfg.max_batch_size == 4
    kv = [i for i in cfg.input if i.name.startswith("past_key_values.")]
    assert len(kv) == 2 * 6 and list(kv[0].dims) == [2, -1, 16]  # heads, past, head_dim
    assert {o.name for o in cfg.output} >= {"logits", "present.0.key"}


def test_a_config_that_does_not_match_the_graph_is_refused(repo: Path, tiny_export: Path) -> None:
    io = read_graph_io(tiny_export / ONNX_FILE)
    text = (repo / "tiny_onnx/config.pbtxt").read_text()
    with pytest.raises(LpDeployError, match="do not match the ONNX graph"):
        check_graph_config(text.replace("TYPE_INT64", "TYPE_INT32", 1), io, "x")
    with pytest.raises(LpDeployError, match="not a valid Triton ModelConfig"):
        parse_config(text.replace("max_batch_size", "max_batch"), "x")


def test_readme_says_what_was_served(repo: Path) -> None:
    text = (repo / "README.md").read_text().replace("**", "").split()
    text = " ".join(text)
    assert "only the python backend" in text and "not served" in text
    assert "tiny_onnx" in text and "tiny_trt" in text and "generate_stream" in text


def test_a_second_model_keeps_the_first_and_files_are_linked(
    repo: Path, tiny_export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    build_repo(TritonRepoConfig(tiny_export, out, name="a"))
    result = build_repo(TritonRepoConfig(tiny_export, out, name="b"))
    assert result.kept_models == ["a", "a_onnx"]
    assert (out / "a/1/model.py").is_file() and (out / "b_onnx/1/model.onnx").is_file()
    src = (tiny_export / ONNX_FILE).stat()
    assert (out / "b_onnx/1/model.onnx").stat().st_ino in (
        src.st_ino,
        (out / "b_onnx/1/model.onnx").stat().st_ino,
    )
    build_repo(TritonRepoConfig(tiny_export, out, name="a"))  # rebuilt in place, b kept
    assert (out / "b/config.pbtxt").is_file()


def test_a_users_repository_needs_overwrite_and_is_kept(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "theirs"
    (out / "other/1").mkdir(parents=True)
    (out / "other/config.pbtxt").write_text('name: "other"\nbackend: "python"\n')
    with pytest.raises(OutputExistsError):
        build_repo(TritonRepoConfig(tiny_export, out, name="m"))
    build_repo(TritonRepoConfig(tiny_export, out, name="m", overwrite=True))
    assert (out / "other/config.pbtxt").is_file() and (out / "m/config.pbtxt").is_file()


def test_bad_inputs_are_refused_before_any_work(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(LpDeployError, match="model name"):
        TritonRepoConfig(tiny_export, tmp_path / "r", name="a b")
    with pytest.raises(LpDeployError, match="device"):
        TritonRepoConfig(tiny_export, tmp_path / "r", device="tpu")
    with pytest.raises(LpDeployError, match="does not exist"):
        build_repo(TritonRepoConfig(tmp_path / "nothing", tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_cli_build(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-repo"
    code = main(
        [
            "triton",
            "build",
            str(tiny_export),
            "--repo",
            str(out),
            "--name",
            "t",
            "--instances",
            "2",
            "--max-batch",
            "3",
        ]
    )
    assert code == 0 and "t_onnx" in capsys.readouterr().out
    cfg = parse_config((out / "t/config.pbtxt").read_text())
    assert cfg.instance_group[0].count == 2 and cfg.parameters["max_batch"].string_value == "3"
