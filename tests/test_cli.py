"""``lp-deploy patch`` end to end on a tiny local model, and its error exits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lp_deploy.checkpoint import load_patched
from lp_deploy.cli import main
from lp_deploy.prune import installed_patches


def _patch_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "patch",
        str(model),
        "--calib",
        str(text),
        "--samples",
        "4",
        "--seqlen",
        "32",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("select", "patch", "ppl_keys"),
    [
        ("cosine", "rotate", {"dense", "pruned", "rotate"}),
        ("bi", "diag", {"dense", "pruned", "diag"}),
        ("3-4", "none", {"dense", "pruned"}),
    ],
)
def test_patch_end_to_end(
    tiny_model_dir: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    select: str,
    patch: str,
    ppl_keys: set[str],
) -> None:
    out = tmp_path / "out"
    argv = _patch_args(
        tiny_model_dir,
        text_file,
        out,
        "--prune",
        "2",
        "--select",
        select,
        "--patch",
        patch,
        "--eval-ppl",
        str(text_file),
        "--ppl-seqlen",
        "32",
        "--ppl-limit",
        "6",
        "-q",
    )
    assert main(argv) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "Loading weights" not in captured.err  # -q: no progress bars
    assert "layers: 8 -> 6" in stdout and f"wrote {out}" in stdout

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["perplexity"]) == ppl_keys
    assert all(math.isfinite(v) and v > 1 for v in summary["perplexity"].values())
    assert summary["layers_before"] == 8 and summary["layers_after"] == 6
    assert len(summary["removed"]) == 2
    assert summary["selection"] == ("manual" if select == "3-4" else select)
    assert summary["perplexity_windows"] == [6, 32]
    assert summary["config"]["patch"] == patch and summary["config"]["progress"] is False
    if select == "3-4":
        assert summary["removed"] == [3, 4]
    if select == "cosine":
        assert summary["gaps"] == [[summary["removed"][0], summary["removed"][0] + 2]]
        assert "cosine similarity across the gap" in stdout

    loaded = load_patched(out)
    assert loaded.meta["plan"]["removed"] == summary["removed"]
    assert loaded.meta["patch"] == {"kind": patch}
    assert loaded.meta["calibration"]["tokens"] == (0 if patch == "none" else 4 * 32)
    assert loaded.model.config.num_hidden_layers == 6
    assert len(installed_patches(loaded.adapter)) == (
        0 if patch == "none" else len(summary["gaps"])
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_quiet_flag_before_the_command(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(["-q", *_patch_args(tiny_model_dir, text_file, out, "--prune", "1")]) == 0
    assert json.loads((out / "summary.json").read_text())["perplexity"] == {}


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lp-deploy patch: error: ")
    return err


def test_missing_model_path(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    err = _fails(_patch_args(tmp_path / "no-such-model", text_file, out, "--prune", "2"), capsys)
    assert "no-such-model" in err and "not found" in err
    assert not out.exists()


@pytest.mark.parametrize("prune", ["8", "9"])
def test_prune_every_layer(
    tiny_model_dir: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    prune: str,
) -> None:
    out = tmp_path / "out"
    err = _fails(_patch_args(tiny_model_dir, text_file, out, "--prune", prune, "-q"), capsys)
    assert f"cannot prune {prune} of 8 layers" in err and "between 1 and 7" in err
    assert not out.exists()


def test_missing_calibration_file(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "missing.txt"
    err = _fails(_patch_args(tiny_model_dir, missing, out, "--prune", "2", "-q"), capsys)
    assert "missing.txt" in err and "not found" in err
    assert not out.exists()


def test_prune_disagrees_with_manual_layers(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _patch_args(tiny_model_dir, text_file, tmp_path / "o", "--prune", "3", "--select", "2,5")
    err = _fails([*argv, "-q"], capsys)
    assert "--prune 3 disagrees with the 2 layers in '2,5'" in err


def test_bad_layer_spec(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _patch_args(tiny_model_dir, text_file, tmp_path / "o", "--select", "3..x")
    assert "bad layer spec" in _fails(argv, capsys)


def test_cosine_needs_a_count(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(_patch_args(tiny_model_dir, text_file, tmp_path / "o"), capsys)
    assert "needs --prune N" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["patch", "m", "--out", "o", "--patch", "hadamard"],  # not a choice
        ["patch", "m"],  # --out is required
        ["patch", "m", "--out", "o", "--prune", "two"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: lp-deploy patch" in capsys.readouterr().err
