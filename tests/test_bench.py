"""The bench stage on tiny random models: FLOP counts, run_bench (PyTorch and ONNX Runtime),
configuration errors, and the ``bench`` / ``sweep`` CLI. No timing assertions."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lp_deploy.artifacts import MANIFEST_FILE
from lp_deploy.benchmarks import bench
from lp_deploy.benchmarks.bench import (
    BenchConfig,
    check_config,
    model_specs,
    parse_tasks,
    run_bench,
)
from lp_deploy.benchmarks.flops import FlopProfile, profile_config_dir, profile_model
from lp_deploy.benchmarks.qa import TASKS
from lp_deploy.checkpoint import load_patched
from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError
from lp_deploy.modules import ScalePatch
from lp_deploy.perplexity import PerplexitySpec

# --------------------------------------------------------------------------- hand counts
# The conftest tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 128, untied.
D, HEADS, HEAD_DIM, KV, MLP, VOCAB = 64, 4, 16, 2 * 16, 128, 128
PER_LAYER = D * D + D * KV + D * KV + D * D + 3 * D * MLP  # q, k, v, o, gate/up/down = 36864
NORMS = 2 * D


def hand_profile(layers: int, patch: bool) -> FlopProfile:
    """FLOPs and parameters of the tiny Llama with ``layers`` layers and a d x d patch."""
    weights = layers * PER_LAYER + D * VOCAB  # decoder linears + lm_head
    linear = 2 * weights + (2 * D * D if patch else 0)
    params = VOCAB * D + layers * (PER_LAYER + NORMS) + D + D * VOCAB + (D * D if patch else 0)
    return FlopProfile(linear, 4 * layers * HEADS * HEAD_DIM, params, layers)


DENSE, PATCHED = hand_profile(8, False), hand_profile(6, True)


def test_hand_counts_are_what_we_think() -> None:
    assert PER_LAYER == 36864
    assert DENSE.linear == 606208 and DENSE.attention == 2048 and DENSE.params == 312384
    assert PATCHED.linear == 466944 and PATCHED.attention == 1536 and PATCHED.params == 242496


def test_flops_of_dense_tiny_model(tiny_model: Any) -> None:
    assert profile_model(tiny_model("llama", sliding=False)) == DENSE


def test_flops_of_patched_checkpoint_and_its_config(tiny_checkpoint: Path) -> None:
    model = load_patched(tiny_checkpoint).model
    assert profile_model(model) == PATCHED
    assert profile_config_dir(tiny_checkpoint) == PATCHED


def test_flops_count_a_per_channel_patch(tiny_model: Any) -> None:
    from lp_deploy.adapters import get_adapter
    from lp_deploy.prune import set_patch

    model = tiny_model("llama")
    set_patch(get_adapter(model), 3, ScalePatch(torch.ones(D)))
    prof = profile_model(model)
    assert prof.linear == DENSE.linear + D and prof.params == DENSE.params + D


def test_prefill_and_decode_flops() -> None:
    p = FlopProfile(linear=100, attention=10, params=0, layers=1)
    assert p.per_token(5) == 150
    assert p.prefill(4) == 4 * 100 + 10 * (1 + 2 + 3 + 4)
    assert p.decode(4, 2) == p.per_token(5) + p.per_token(6)


# --------------------------------------------------------------------------- configuration


@pytest.fixture(scope="session")
def qa_dir() -> Path:
    from lp_deploy.data import default_data_dir

    path = default_data_dir()
    if not (path / "copa" / "val.jsonl").is_file() or not (path / "arc").is_dir():
        pytest.skip(f"QA data not found in {path}; set LP_DEPLOY_DATA_DIR")
    return path


def test_parse_tasks() -> None:
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("copa, arc_easy") == ["copa", "arc_easy"]
    with pytest.raises(LpDeployError, match="unknown QA task"):
        parse_tasks("copa,nope")


def test_check_config_errors(tmp_path: Path, tiny_checkpoint: Path, tiny_model_dir: Path) -> None:
    def cfg(**kw: Any) -> BenchConfig:
        return BenchConfig(**{"candidates": [tiny_checkpoint], "out": tmp_path / "r", **kw})

    with pytest.raises(LpDeployError, match="does not exist"):
        check_config(cfg(candidates=[tmp_path / "missing"]))
    with pytest.raises(LpDeployError, match="unknown runtime"):
        check_config(cfg(runtimes=["tflite"]))
    with pytest.raises(LpDeployError, match="unknown QA task"):
        check_config(cfg(tasks=["nope"]))
    with pytest.raises(LpDeployError, match="--repeats"):
        check_config(cfg(repeats=0))
    with pytest.raises(LpDeployError, match="--qa-workers"):
        check_config(cfg(qa_workers=0))
    with pytest.raises(LpDeployError, match="pass --baseline"):
        check_config(cfg(candidates=[tiny_model_dir]))  # a plain model records no source
    ok = check_config(cfg(runtimes=["ort", "torch", "onnxruntime"], tasks=["all"]))
    assert ok.baseline == str(tiny_model_dir)  # from the checkpoint's metadata
    assert ok.runtimes == ["onnxruntime", "torch"] and ok.tasks == list(TASKS)


def test_model_names_are_unique(tiny_model_dir: Path) -> None:
    cfg = BenchConfig(candidates=[tiny_model_dir], out=Path("r"), baseline=str(tiny_model_dir))
    assert [s.name for s in model_specs(cfg)] == ["model", "model-2"]


# --------------------------------------------------------------------------- run_bench, torch


def strict_json(path: Path) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")

    data: dict[str, Any] = json.loads(path.read_text(), parse_constant=refuse)
    return data


@pytest.fixture(scope="module")
def torch_report(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    text_file: Path,
    qa_dir: Path,
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "report"
    cfg = BenchConfig(
        candidates=[tiny_checkpoint],
        out=out,
        runtimes=["torch", "tensorrt"],
        tasks=["copa", "arc_easy"],
        limit=6,
        perplexity=PerplexitySpec(str(text_file), seqlen=32, limit=2),
        latency=True,
        memory=True,
        prompt_lengths=[16],
        batch_sizes=[1, 2],
        decode_tokens=3,
        repeats=2,
        warmup=1,
        data_dir=qa_dir,
        progress=False,
    )
    run_bench(cfg)
    return out, strict_json(out / "report.json")


def test_report_files(torch_report: tuple[Path, dict[str, Any]]) -> None:
    import matplotlib.image

    out, data = torch_report
    names = {p.name for p in out.iterdir()}
    plots = {"accuracy.png", "latency.png", "memory.png"}
    assert names == {"report.json", "report.md", *plots, MANIFEST_FILE}
    for png in ("accuracy.png", "latency.png", "memory.png"):
        height, width, _ = matplotlib.image.imread(out / png).shape
        assert height > 300 and width > 500
    assert data["plots"] == ["accuracy.png", "latency.png", "memory.png"]
    md = (out / "report.md").read_text()
    for heading in ("## Models", "## Accuracy", "## Perplexity", "## Latency", "## Memory"):
        assert heading in md
    assert "RP patched" in md and "FLOP-ideal" in md and "| tensorrt | skipped |" in md


def test_report_environment_and_models(torch_report: tuple[Path, dict[str, Any]]) -> None:
    _, data = torch_report
    env = data["environment"]
    assert env["cpu"] and env["cores"] >= 1 and env["date"] and env["command"]
    for package in ("torch", "transformers", "onnxruntime", "lp-deploy"):
        assert package in env["versions"]
    assert data["baseline"] == "model"  # the checkpoint's recorded source
    models = data["models"]
    assert models["model"]["role"] == "baseline" and models["patched"]["role"] == "candidate"
    assert models["model"]["params"] == DENSE.params and models["model"]["layers"] == 8
    assert models["patched"]["params"] == PATCHED.params and models["patched"]["layers"] == 6
    assert models["patched"]["removed"] and models["patched"]["patch"] == "rotate"
    assert models["patched"]["disk_bytes"] < models["model"]["disk_bytes"]


def test_tensorrt_is_a_skipped_runtime(torch_report: tuple[Path, dict[str, Any]]) -> None:
    import onnxruntime

    block = torch_report[1]["runtimes"]["tensorrt"]
    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("TensorRT is installed here")
    assert block["status"] == "skipped" and "not installed" in block["reason"]


def test_accuracy_and_retained_performance(torch_report: tuple[Path, dict[str, Any]]) -> None:
    block = torch_report[1]["runtimes"]["torch"]
    assert block["status"] == "ok"
    base, cand = block["models"]["model"], block["models"]["patched"]
    for entry in (base, cand):
        assert set(entry["tasks"]) == {"copa", "arc_easy"}
        for task in entry["tasks"].values():
            assert task["n"] == 6 and 0.0 <= task["acc"] <= 1.0
        assert entry["perplexity"] > 1.0 and math.isfinite(entry["perplexity"])
    assert base["perplexity_ratio"] == 1.0
    for metric in ("acc", "acc_norm"):
        rp = base["rp"][metric]
        for task, result in base["tasks"].items():
            norm = result["acc_norm"] if metric == "acc_norm" else None
            value = result["acc"] if norm is None else norm
            assert rp[task] == (1.0 if value > 0 else None)  # NaN for a zero baseline -> null
    assert base["rp"]["acc"]["average"] == 1.0
    cand_avg = sum(t["acc"] for t in cand["tasks"].values())
    base_avg = sum(t["acc"] for t in base["tasks"].values())
    assert cand["rp"]["acc"]["average"] == pytest.approx(cand_avg / base_avg)


def test_latency_ratios_and_flop_ideal(torch_report: tuple[Path, dict[str, Any]]) -> None:
    shapes = torch_report[1]["runtimes"]["torch"]["latency"]
    assert [(s["prompt_length"], s["batch_size"]) for s in shapes] == [(16, 1), (16, 2)]
    prefill_ideal = PATCHED.prefill(16) / DENSE.prefill(16)
    decode_ideal = PATCHED.decode(16, 3) / DENSE.decode(16, 3)
    assert prefill_ideal == (16 * 466944 + 1536 * 136) / (16 * 606208 + 2048 * 136)
    for shape in shapes:
        for phase, ideal in (("prefill", prefill_ideal), ("decode", decode_ideal)):
            base, cand = shape[phase]["model"], shape[phase]["patched"]
            assert base["ratio"] == 1.0 and base["flop_ratio"] == 1.0
            assert cand["ratio"] > 0 and cand["tokens_per_s"] > 0
            assert cand["flop_ratio"] == pytest.approx(ideal, rel=1e-12)
            lo, hi = cand["ratio_ci95"]
            assert 0 < lo <= hi and base["ratio_ci95"] == [1.0, 1.0]
        assert shape["prefill"]["model"]["n"] == 2
        assert shape["decode"]["patched"]["n"] == 2 * 3  # repeats x steps
        assert shape["decode"]["patched"]["p90_ms_per_token"] >= 0


def test_memory_measured_in_fresh_processes(torch_report: tuple[Path, dict[str, Any]]) -> None:
    for entry in torch_report[1]["runtimes"]["torch"]["models"].values():
        mem = entry["memory"]
        assert "error" not in mem, mem
        assert mem["peak_rss_mb"] > 50 and mem["model_rss_mb"] >= 0 and "ru_maxrss_mb" in mem


# --------------------------------------------------------------------------- ONNX Runtime


@pytest.fixture(scope="module")
def onnx_report(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, qa_dir: Path
) -> tuple[BenchConfig, dict[str, Any]]:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    cfg = BenchConfig(
        candidates=[tiny_checkpoint],
        out=tmp_path_factory.mktemp("bench-ort") / "report",
        runtimes=["onnxruntime"],
        tasks=["copa"],
        limit=3,
        latency=True,
        prompt_lengths=[8],
        decode_tokens=2,
        repeats=1,
        warmup=0,
        data_dir=qa_dir,
        progress=False,
    )
    return cfg, run_bench(cfg).data


def test_onnx_exported_on_the_fly(onnx_report: tuple[BenchConfig, dict[str, Any]]) -> None:
    cfg, result = onnx_report
    block = result["runtimes"]["onnxruntime"]
    assert block["status"] == "ok", block
    for name in ("model", "patched"):
        artifact = Path(block["models"][name]["artifact"])
        assert artifact == Path(cfg.out) / "artifacts" / f"{name}-onnx"
        assert (artifact / "model.onnx").is_file()
        assert block["models"][name]["tasks"]["copa"]["n"] == 3
    assert block["models"]["model"]["rp"]["acc"]["average"] in (1.0, None)
    # FLOPs and parameters come from the export's config when no PyTorch model is loaded
    assert result["models"]["model"]["params"] == DENSE.params
    assert result["models"]["patched"]["params"] == PATCHED.params
    ideal = PATCHED.prefill(8) / DENSE.prefill(8)
    assert block["latency"][0]["prefill"]["patched"]["flop_ratio"] == pytest.approx(ideal)


def test_onnx_export_is_reused(onnx_report: tuple[BenchConfig, dict[str, Any]]) -> None:
    cfg, _ = onnx_report
    onnx = Path(cfg.out) / "artifacts" / "patched-onnx" / "model.onnx"
    before = onnx.stat().st_mtime_ns
    cfg.latency = False
    result = run_bench(cfg).data
    assert onnx.stat().st_mtime_ns == before
    assert result["runtimes"]["onnxruntime"]["status"] == "ok"
    assert (Path(cfg.out) / "report.json").is_file()
    assert not (Path(cfg.out) / "latency.png").exists()  # stale plot of the first run removed


def test_qa_workers_score_like_one_process(
    onnx_report: tuple[BenchConfig, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, first = onnx_report
    pools: list[int] = []

    class Spy(bench.ScoringPool):
        def __init__(self, kind: str, source: Any, workers: int, *args: Any) -> None:
            pools.append(workers)
            super().__init__(kind, source, workers, *args)

    monkeypatch.setattr(bench, "ScoringPool", Spy)
    again = run_bench(replace(cfg, qa_workers=2, latency=False)).data
    assert pools == [2, 2]  # one pool of 2 workers per model scored the QA
    for name in ("model", "patched"):
        want = first["runtimes"]["onnxruntime"]["models"][name]["tasks"]["copa"]
        got = again["runtimes"]["onnxruntime"]["models"][name]["tasks"]["copa"]
        assert got["correct"] == want["correct"] and got["acc"] == want["acc"]


# --------------------------------------------------------------------------- CLI


def test_cli_bench(
    tmp_path: Path, tiny_checkpoint: Path, qa_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rep"
    argv = ["-q", "bench", "--candidate", str(tiny_checkpoint), "--tasks", "copa"]
    argv += ["--limit", "2", "--data-dir", str(qa_dir), "--out", str(out)]
    assert main(argv) == 0
    assert strict_json(out / "report.json")["runtimes"]["torch"]["status"] == "ok"
    assert "## Accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--candidate", "/nonexistent/ckpt"], "does not exist"),
        (["--tasks", "copa,nope"], "unknown QA task"),
        (["--runtime", "tflite"], "unknown runtime"),
    ],
    ids=["missing-candidate", "unknown-task", "unknown-runtime"],
)
def test_cli_bench_bad_input(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["-q", "bench", "--out", str(tmp_path / "rep")]
    if "--candidate" not in extra:
        argv += ["--candidate", str(tiny_checkpoint)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert "lp-deploy bench: error:" in err and message in err
    assert not (tmp_path / "rep").exists()


def test_cli_bench_bad_number_list(tmp_path: Path, tiny_checkpoint: Path) -> None:
    argv = ["bench", "--candidate", str(tiny_checkpoint), "--prompt-lengths", "a,b"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_cli_sweep(
    tmp_path: Path,
    tiny_model_dir: Path,
    text_file: Path,
    qa_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", str(tiny_model_dir), "--prune", "1..2", "--patches", "none,rotate"]
    argv += ["--calib", str(text_file), "--samples", "4", "--seqlen", "32"]
    argv += ["--ppl", str(text_file), "--ppl-seqlen", "32", "--ppl-limit", "2"]
    argv += ["--tasks", "copa", "--limit", "1", "--data-dir", str(qa_dir), "--out", str(out)]
    assert main(argv) == 0
    data = strict_json(out / "sweep.json")  # one question: its standard error is null, not NaN
    assert all(p["metrics"]["acc_copa_stderr"] is None for p in data["points"])
    assert [(p["select"], p["prune"], p["patch"]) for p in data["points"]] == [
        ("cosine", 1, "none"),
        ("cosine", 1, "rotate"),
        ("cosine", 2, "none"),
        ("cosine", 2, "rotate"),
    ]
    metrics = {"ppl", "acc_copa", "acc_copa_stderr"}
    assert all(set(p["metrics"]) == metrics for p in data["points"])
    assert set(data["baseline"]["metrics"]) == metrics
    assert data["seconds"] > 0 and (out / "sweep.png").is_file()
    assert not (out / "front.png").exists()  # no speed measured, no front
    stdout = capsys.readouterr().out
    assert "acc_copa" in stdout and f"in {data['seconds']} s" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--patches", "none,bogus"], "--patches"),
        (["--tasks", "nope"], "unknown QA task"),
        (["--select", "cosine,nope"], "sweep --select takes a comma list of cosine"),
        (["--select", "cosine,bi", "--candidates", "3"], "--candidates applies to --select ppl"),
        (["--latency", "--latency-repeats", "0"], "--latency-repeats must be >= 1"),
    ],
    ids=["bad-patch", "unknown-task", "bad-select", "candidates-without-ppl", "no-repeats"],
)
def test_cli_sweep_bad_input(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    argv = ["-q", "sweep", str(tiny_model_dir), "--out", str(tmp_path / "s"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_sweep_latency_methods_and_folded_points(
    tmp_path: Path, tiny_model_dir: Path, text_file: Path, qa_dir: Path
) -> None:
    out = tmp_path / "sweep"
    argv = ["-q", "sweep", str(tiny_model_dir), "--prune", "2", "--patches", "rotate,rotate+fold"]
    argv += ["--select", "cosine,bi", "--tasks", "copa,wsc273", "--limit", "4"]
    argv += ["--data-dir", str(qa_dir), "--calib", str(text_file), "--samples", "4"]
    argv += ["--seqlen", "32", "--latency", "--ppl", str(text_file), "--ppl-seqlen", "32"]
    argv += ["--ppl-limit", "2", "--out", str(out)]
    assert main(argv) == 0
    data = strict_json(out / "sweep.json")
    base = data["baseline"]["metrics"]
    assert base["gen_time_ratio"] == base["decode_speedup"] == base["flop_ratio"] == 1.0
    assert [(p["select"], p["patch"]) for p in data["points"]] == [
        ("cosine", "rotate"),
        ("cosine", "rotate+fold"),
        ("bi", "rotate"),
        ("bi", "rotate+fold"),
    ]
    for point in data["points"]:
        m = point["metrics"]
        assert m["gen_time_ratio"] > 0 and m["decode_speedup"] > 0
        assert 0 < m["flop_ratio"] < 1  # 6 of 8 layers remain
        # two tasks of independent questions: the mean's standard error from the tasks'
        tasks = ("copa", "wsc273")
        assert m["acc_avg"] == pytest.approx(sum(m[f"acc_{t}"] for t in tasks) / 2)
        want = math.sqrt(sum(m[f"acc_{t}_stderr"] ** 2 for t in tasks)) / 2
        assert m["acc_avg_stderr"] == pytest.approx(want) and want > 0
    rotate, folded = data["points"][:2]
    # folding is exact, so it must not move perplexity
    assert folded["metrics"]["ppl"] == pytest.approx(rotate["metrics"]["ppl"], rel=1e-4)
    assert (out / "front.png").is_file() and (out / "sweep.png").is_file()


def test_qa_speed_side_by_side(
    tiny_checkpoint: Path, qa_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lp_deploy.benchmarks import qa_speed

    argv = [str(tiny_checkpoint), "--runtime", "torch", "--tasks", "copa,arc_easy", "--limit", "3"]
    assert qa_speed.main([*argv, "--data-dir", str(qa_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in rows] == ["copa", "arc_easy", "total"]
    copa = rows[0]
    assert (copa["n"], copa["full_n"]) == (3, 100)
    assert set(copa["seconds"]) == {"plain", "shared"} and min(copa["seconds"].values()) > 0
    scale = copa["full_seconds_estimate"]["plain"] / copa["seconds"]["plain"]
    assert scale == pytest.approx(100 / 3)
    assert rows[-1]["n"] == 6 and rows[-1]["max_abs_diff"] <= 1e-3
    with pytest.raises(SystemExit):
        qa_speed.main([*argv, "--tasks", "nope"])
