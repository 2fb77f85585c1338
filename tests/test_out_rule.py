"""One ``--out`` rule for every stage: a new directory or an earlier artifact of the same kind;
anything else is refused unless ``--overwrite``, and no file lp-deploy did not write is ever
deleted or replaced."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lp_deploy.artifacts import (
    MANIFEST_FILE,
    Kind,
    check_out,
    dir_kind,
    foreign_files,
    inspect_artifact,
    output_dir,
)
from lp_deploy.cli import main
from lp_deploy.errors import OutputExistsError

NOTE = "notes.txt"


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / NOTE).write_text("mine")
    return path


def _write(out: Path, kind: Kind, files: dict[str, str], overwrite: bool = False) -> None:
    with output_dir(out, kind, overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


# --------------------------------------------------------------------------- the rule itself


def test_new_directory_and_replacing_an_earlier_artifact(tmp_path: Path) -> None:
    out = tmp_path / "a"
    _write(out, Kind.SWEEP, {"sweep.json": "1", "sweep.png": "x"})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "sweep" and manifest["files"] == ["sweep.json", "sweep.png"]
    assert dir_kind(out) == Kind.SWEEP
    _write(out, Kind.SWEEP, {"sweep.json": "2"})  # replaced whole: the old plot is gone
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "sweep.json"]
    assert (out / "sweep.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary or old dirs left


def test_a_users_directory_is_refused_and_kept(tmp_path: Path) -> None:
    out = _user_dir(tmp_path / "mine")
    with pytest.raises(OutputExistsError, match=rf"{NOTE}.*--overwrite"):
        check_out(out, Kind.CHECKPOINT)
    with pytest.raises(OutputExistsError), output_dir(out, Kind.SWEEP):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in out.iterdir()) == [NOTE]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_another_kind_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "a"
    _write(out, Kind.SWEEP, {"sweep.json": "1"})
    with pytest.raises(OutputExistsError, match="is an lp-deploy sweep"):
        check_out(out, Kind.REPORT)


def test_overwrite_writes_beside_the_users_files(tmp_path: Path) -> None:
    out = _user_dir(tmp_path / "mine")
    _write(out, Kind.SWEEP, {"sweep.json": "1", "sweep.png": "x"}, overwrite=True)
    assert (out / NOTE).read_text() == "mine"
    assert foreign_files(out, Kind.SWEEP) == [NOTE]
    _write(out, Kind.SWEEP, {"sweep.json": "2"}, overwrite=True)  # our stale plot goes
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, NOTE, "sweep.json"]


def test_overwrite_never_replaces_a_users_file(tmp_path: Path) -> None:
    out = _user_dir(tmp_path / "mine")
    (out / "sweep.json").write_text("the user's own")
    with pytest.raises(OutputExistsError, match=r"sweep\.json.*did not write"):
        _write(out, Kind.SWEEP, {"sweep.json": "1"}, overwrite=True)
    assert (out / "sweep.json").read_text() == "the user's own"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_failed_build_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a"
    _write(out, Kind.SWEEP, {"sweep.json": "1"})
    with pytest.raises(RuntimeError), output_dir(out, Kind.SWEEP) as tmp:
        (tmp / "sweep.json").write_text("half")
        raise RuntimeError("crash")
    assert (out / "sweep.json").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_out(tmp_path / "f", Kind.ONNX)


def test_legacy_artifacts_without_a_manifest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Directories written before manifests existed are recognised by their files."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != MANIFEST_FILE:
            (legacy / f.name).write_bytes(f.read_bytes())
    assert inspect_artifact(legacy).kind == Kind.CHECKPOINT
    assert foreign_files(legacy, Kind.CHECKPOINT) == []
    (legacy / NOTE).write_text("mine")  # mixed, no manifest: nothing counts as ours
    assert foreign_files(legacy, Kind.CHECKPOINT) == sorted(p.name for p in legacy.iterdir())


# --------------------------------------------------------------------------- every stage


def _stages(
    tiny_model_dir: Path, tiny_checkpoint: Path, text_file: Path, qa: Path
) -> dict[str, Callable[[Path], list[str]]]:
    calib = ["--calib", str(text_file), "--samples", "2", "--seqlen", "16"]
    return {
        "patch": lambda out: ["patch", str(tiny_model_dir), "--prune", "2", *calib],
        "fold": lambda out: ["fold", str(tiny_checkpoint), "--verify-seqlen", "16"],
        "distill": lambda out: [
            "distill",
            str(tiny_checkpoint),
            "--data",
            str(text_file),
            "--samples",
            "2",
            "--seqlen",
            "16",
            "--topk",
            "4",
            "--teacher-cache",
            str(qa / "teacher"),
        ],
        "export onnx": lambda out: ["export", "onnx", str(tiny_checkpoint), "--decode-steps", "1"],
        "bench": lambda out: [
            "bench",
            "--candidate",
            str(tiny_checkpoint),
            "--ppl",
            str(text_file),
            "--ppl-seqlen",
            "16",
            "--ppl-limit",
            "1",
        ],
        "sweep": lambda out: [
            "sweep",
            str(tiny_model_dir),
            "--prune",
            "1",
            "--patches",
            "none",
            *calib,
            "--ppl",
            "none",
        ],
    }


STAGES = ["patch", "fold", "distill", "export onnx", "bench", "sweep"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_users_directory(
    stage: str,
    tiny_model_dir: Path,
    tiny_checkpoint: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _user_dir(tmp_path / "mine")
    argv = _stages(tiny_model_dir, tiny_checkpoint, text_file, tmp_path)[stage](out)
    assert main(["-q", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"lp-deploy {stage.split()[0]}: error:" in err and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == [NOTE]
    assert (out / NOTE).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("stage", ["patch", "fold", "distill", "sweep"])
def test_every_stage_writes_beside_a_users_file_with_overwrite(
    stage: str, tiny_model_dir: Path, tiny_checkpoint: Path, text_file: Path, tmp_path: Path
) -> None:
    out = _user_dir(tmp_path / "mine")
    argv = _stages(tiny_model_dir, tiny_checkpoint, text_file, tmp_path)[stage](out)
    assert main(["-q", *argv, "--out", str(out), "--overwrite"]) == 0
    assert (out / NOTE).read_text() == "mine"
    assert inspect_artifact(out).kind in (Kind.CHECKPOINT, Kind.SWEEP)
    # and a second run, without --overwrite, is still refused: the user's file is there
    assert main(["-q", *argv, "--out", str(out)]) == 2


def test_triton_build_follows_the_rule(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    out = _user_dir(tmp_path / "mine")
    argv = ["-q", "triton", "build", str(tiny_export), "--repo", str(out), "--name", "m"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lp-deploy triton: error:" in err and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == [NOTE]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / NOTE).read_text() == "mine" and inspect_artifact(out).kind == Kind.TRITON_REPO
