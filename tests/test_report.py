"""The bench report on a synthetic result: strict JSON, Markdown tables, plots, publishing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lp_deploy.benchmarks.report import (
    clean_json,
    environment,
    plot_accuracy,
    plot_latency,
    plot_memory,
    render_markdown,
    write_report,
)


def _task(acc: float, norm: float | None, n: int = 10) -> dict[str, Any]:
    return {
        "task": "t",
        "n": n,
        "acc": acc,
        "acc_norm": norm,
        "acc_stderr": 0.1,
        "acc_norm_stderr": None,
    }


def _shape(length: int) -> dict[str, Any]:
    def pre(ms: float, ratio: float, ideal: float) -> dict[str, Any]:
        return {
            "median_ms": ms,
            "p90_ms": ms * 1.1,
            "mean_ms": ms,
            "n": 3,
            "tokens_per_s": 1e3 * length / ms,
            "ratio": ratio,
            "flop_ratio": ideal,
        }

    def dec(ms: float, ratio: float, ideal: float) -> dict[str, Any]:
        return {
            "median_ms_per_token": ms,
            "p90_ms_per_token": ms * 1.2,
            "mean_ms_per_token": ms,
            "n": 24,
            "tokens_per_s": 1e3 / ms,
            "ratio": ratio,
            "flop_ratio": ideal,
        }

    return {
        "prompt_length": length,
        "batch_size": 1,
        "decode_tokens": 8,
        "prefill": {"base": pre(100.0, 1.0, 1.0), "cand": pre(85.0, 0.85, 0.83)},
        "decode": {
            "base": dec(40.0, 1.0, 1.0),
            "cand": {**dec(35.0, 0.875, 0.84), "ratio_ci95": [0.86, 0.89]},
        },
        "cuda_peak_mb": None,
    }


def _model_block(acc: float, ppl: float, rp: float) -> dict[str, Any]:
    return {
        "artifact": "/x",
        "disk_bytes": 500 * 2**20,
        "tasks": {"copa": _task(acc, None), "arc_easy": _task(acc / 2, acc / 3)},
        "perplexity": ppl,
        "rp": {
            "acc": {"copa": rp, "arc_easy": math.nan, "average": rp},
            "acc_norm": {"average": rp},
        },
        "memory": {"peak_rss_mb": 900.0, "model_rss_mb": 500.0, "cuda_peak_mb": None},
    }


def synthetic_result() -> dict[str, Any]:
    """A result shaped like run_bench's: torch ok, tensorrt skipped."""
    torch_block = {
        "runtime": "torch",
        "status": "ok",
        "reason": None,
        "baseline": "base",
        "models": {"base": _model_block(0.6, 20.0, 1.0), "cand": _model_block(0.5, 25.0, 0.8)},
        "latency": [
            _shape(64),
            {"prompt_length": 4096, "batch_size": 1, "skipped": "exceeds the context"},
        ],
    }
    torch_block["models"]["base"]["perplexity_ratio"] = 1.0
    torch_block["models"]["cand"]["perplexity_ratio"] = 1.25
    trt = {
        "runtime": "tensorrt",
        "status": "skipped",
        "reason": "TensorRT is not installed",
        "baseline": "base",
        "models": {},
        "latency": [],
    }
    model = {
        "layers": 30,
        "params": 134_515_008,
        "removed": None,
        "patch": None,
        "fold": None,
        "disk_bytes": 538 * 2**20,
        "flops_per_token": {"64": 270_000_000},
    }
    return {
        "schema": "lp-deploy-bench/1",
        "config": {
            "prompt_lengths": [64],
            "tasks": ["copa", "arc_easy"],
            "perplexity": {"data": "test.txt", "seqlen": 512, "limit": 4},
            "repeats": 3,
            "warmup": 1,
            "decode_tokens": 8,
        },
        "environment": environment(2, "lp-deploy bench ...", "cpu"),
        "baseline": "base",
        "models": {
            "base": {**model, "role": "baseline", "source": "smollm2-135m"},
            "cand": {
                **model,
                "role": "candidate",
                "source": "/tmp/p5",
                "layers": 25,
                "removed": [12, 13, 14, 15, 16],
                "patch": "rotate",
            },
        },
        "runtimes": {"torch": torch_block, "tensorrt": trt},
        "seconds": 12.5,
    }


def test_clean_json_is_strict() -> None:
    data = clean_json({"a": math.nan, "b": [math.inf, 1.5], "c": (Path("/x"), 2), 3: "k"})
    assert data == {"a": None, "b": [None, 1.5], "c": ["/x", 2], "3": "k"}
    json.dumps(data, allow_nan=False)


def test_environment_keys() -> None:
    env = environment(3, "cmd", "cpu")
    assert env["threads_requested"] == 3 and env["command"] == "cmd"
    for key in ("cpu", "cores", "cores_available", "torch_threads", "gpu", "date", "platform"):
        assert key in env
    assert env["versions"]["torch"] and env["versions"]["lp-deploy"]


def test_markdown_tables() -> None:
    md = render_markdown(clean_json(synthetic_result()))
    assert md.startswith("# lp-deploy bench")
    assert "| tensorrt | skipped | TensorRT is not installed |" in md
    assert "| copa | 10 | 0.600 ± 0.100 | 0.500 ± 0.100 | 0.800 |" in md  # base, cand, RP
    assert "| arc_easy | 10 | 0.300 ± 0.100 (0.200) | 0.250 ± 0.100 (0.167) | – |" in md
    # the average's stderr: sqrt(0.1^2 + 0.1^2) / 2 (tasks independent)
    assert "| **average** |  | 0.450 ± 0.071 | 0.375 ± 0.071 | **0.800** |" in md
    assert "| torch | cand | 25.000 | 1.250 |" in md
    row = "| 64 × 1 | cand | 85.0 / 93.5 | 0.850 | 0.830 | 35.00 / 42.00 | 28.6 |"
    assert row + " 0.875 (0.860–0.890) | 0.840 |" in md  # without an interval: old reports
    assert "exceeds the context" in md
    assert "| torch | base (baseline) | 900.0 | 500.0 | – | 134.52M | 500.0 MB |" in md
    assert "| cand | candidate | 25 | 134.52M | 12,13,14,15,16 | rotate | no |" in md


def test_plots_only_with_data(tmp_path: Path) -> None:
    result = clean_json(synthetic_result())
    assert plot_accuracy(result, tmp_path / "a.png") and (tmp_path / "a.png").is_file()
    assert plot_latency(result, tmp_path / "l.png") and (tmp_path / "l.png").is_file()
    assert plot_memory(result, tmp_path / "m.png") and (tmp_path / "m.png").is_file()
    bare = copy.deepcopy(result)
    for entry in bare["runtimes"]["torch"]["models"].values():
        for key in ("tasks", "perplexity", "memory"):
            entry.pop(key)
    bare["runtimes"]["torch"]["latency"] = []
    assert not plot_accuracy(bare, tmp_path / "a2.png")
    assert not plot_latency(bare, tmp_path / "l2.png")
    assert not plot_memory(bare, tmp_path / "m2.png")
    assert not list(tmp_path.glob("*2.png"))


def test_write_report_publishes_and_removes_stale_plots(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "latency.png").write_bytes(b"old")
    (out / "keep.txt").write_text("user file")
    result = synthetic_result()
    result["runtimes"]["torch"]["latency"] = []
    written = write_report(result, out)
    assert {p.name for p in written} == {"accuracy.png", "memory.png", "report.md", "report.json"}
    assert {p.name for p in out.iterdir()} == {
        "accuracy.png",
        "memory.png",
        "report.md",
        "report.json",
        "keep.txt",
    }
    data = json.loads((out / "report.json").read_text())
    assert data["plots"] == ["accuracy.png", "memory.png"]
    assert data["runtimes"]["torch"]["models"]["base"]["rp"]["acc"]["arc_easy"] is None
    assert "![memory.png](memory.png)" in (out / "report.md").read_text()


def test_write_report_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lp_deploy.benchmarks.report as report

    def boom(result: dict[str, Any]) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        write_report(synthetic_result(), tmp_path / "rep")
    assert list((tmp_path / "rep").iterdir()) == []


def test_paired_differences_table() -> None:
    """Every candidate against the baseline, with its standard error and a star only where
    the difference is beyond 1.96 standard errors."""
    result = synthetic_result()
    models = result["runtimes"]["torch"]["models"]
    significant = {"diff": -0.1, "stderr": 0.02, "n": 10, "significant": True}
    noise = {"diff": 0.05, "stderr": 0.05, "n": 10, "significant": False}
    models["cand"]["paired"] = {"base": {"copa": significant, "arc_easy": noise, "all": noise}}
    models["base"]["paired"] = {"cand": {}}
    md = render_markdown(clean_json(result))
    assert "## Paired differences" in md
    assert "| cand − base (baseline) | -0.100 ± 0.020* | +0.050 ± 0.050 | +0.050 ± 0.050 |" in md
