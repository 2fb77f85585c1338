"""The bench report: ``report.json``, ``report.md`` and PNG plots, published atomically.

Everything is written to a temporary directory inside the report directory and moved into
place when complete (``report.json`` last), so a crashed run never leaves a half report.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lp_deploy import __version__
from lp_deploy.artifacts import clean_json

PLOTS = ("accuracy.png", "latency.png", "memory.png")
PACKAGES = ("torch", "transformers", "onnxruntime", "onnx", "numpy")

# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment(
    threads: int | None = None, command: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Machine, library versions, command line and date of this run."""
    import torch

    affinity = getattr(os, "sched_getaffinity", None)
    versions = {p: _version(p) for p in PACKAGES}
    versions["lp-deploy"] = _version("lp-deploy") or __version__
    versions["python"] = platform.python_version()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(affinity(0)) if affinity else os.cpu_count(),
        "threads_requested": threads,
        "torch_threads": torch.get_num_threads(),
        "gpu": _gpu(),
        "device": device,
        "platform": platform.platform(),
        "versions": versions,
        "command": command or shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- JSON


# --------------------------------------------------------------------------- formatting


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _mb(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f} MB"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def _ok_runtimes(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, b) for n, b in result["runtimes"].items() if b["status"] == "ok"]


def _label(result: dict[str, Any], name: str) -> str:
    return f"{name} (baseline)" if name == result["baseline"] else name


# --------------------------------------------------------------------------- markdown


def _md_header(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    cands = [n for n, m in result["models"].items() if m["role"] == "candidate"]
    return [
        "# lp-deploy bench",
        "",
        f"- date: {env['date']}; took {result['seconds']} s",
        f"- command: `{env['command']}`",
        f"- machine: {env['cpu']}, {env['cores_available']} of {env['cores']} cores, "
        f"{env['torch_threads']} torch threads; GPU: {env['gpu'] or 'none'}",
        f"- baseline: **{result['baseline']}**; candidates: {', '.join(cands)}",
        "",
    ]


def _md_models(result: dict[str, Any]) -> list[str]:
    lengths = result["config"]["prompt_lengths"]
    ctx = str(lengths[0]) if lengths else None
    rows = []
    for name, m in result["models"].items():
        per_token = (m.get("flops_per_token") or {}).get(ctx) if ctx else None
        removed = m.get("removed")
        rows.append(
            [
                name,
                m["role"],
                str(m.get("layers", "–")),
                _count(m.get("params")),
                ",".join(map(str, removed)) if removed else "–",
                m.get("patch") or "–",
                "yes" if m.get("fold") else "no",
                _count(per_token),
                _mb(m.get("disk_bytes")),
            ]
        )
    header = ["model", "role", "layers", "params", "removed", "patch", "folded"]
    header += [f"FLOPs/token @{ctx}", "on disk"]
    return ["## Models", "", *_table(header, rows)]


def _md_runtimes(result: dict[str, Any]) -> list[str]:
    rows = []
    for name, block in result["runtimes"].items():
        notes = [block["reason"]] if block.get("reason") else []
        notes += [f"{m}: {e['error']}" for m, e in block["models"].items() if e.get("error")]
        rows.append([name, block["status"], "; ".join(notes).replace("|", "/") or "–"])
    return ["## Runtimes", "", *_table(["runtime", "status", "notes"], rows)]


def _pm(value: float | None, stderr: float | None) -> str:
    """``value ± stderr`` (the stderr left out when unknown)."""
    if stderr is None or not math.isfinite(stderr):
        return _num(value)
    return f"{_num(value)} ± {_num(stderr)}"


def _acc_cell(task: dict[str, Any]) -> str:
    cell = _pm(task["acc"], task.get("acc_stderr"))
    return cell + (f" ({_num(task['acc_norm'])})" if task.get("acc_norm") is not None else "")


def average_accuracy(tasks: dict[str, dict[str, Any]]) -> tuple[float, float | None]:
    """Mean acc over tasks (equal weight per task) and its standard error (tasks independent:
    ``sqrt(sum se_t^2) / T``)."""
    accs = [t["acc"] for t in tasks.values()]
    ses = [t.get("acc_stderr") for t in tasks.values()]
    mean = sum(accs) / len(accs)
    if any(se is None or not math.isfinite(se) for se in ses):
        return mean, None
    return mean, math.sqrt(sum(float(se) ** 2 for se in ses if se is not None)) / len(ses)


def _diff_cell(d: dict[str, Any] | None) -> str:
    """``+0.012 ± 0.005*`` (``*``: beyond 1.96 standard errors)."""
    if not d:
        return "–"
    star = "*" if d.get("significant") else ""
    return f"{d['diff']:+.3f} ± {_num(d['stderr'])}{star}"


def _md_paired_runtime(runtime: str, block: dict[str, Any], result: dict[str, Any]) -> list[str]:
    models = [n for n, e in block["models"].items() if e.get("paired")]
    if len(models) < 2:
        return []
    base = block["baseline"]
    tasks = list(block["models"][models[0]]["tasks"])
    pairs = [(n, base) for n in models if n != base]
    cands = [n for n in models if n != base]
    pairs += [(a, b) for i, a in enumerate(cands) for b in cands[i + 1 :]]
    rows = []
    for a, b in pairs:
        diffs = block["models"][a]["paired"].get(b, {})
        label = f"{_label(result, a)} − {_label(result, b)}"
        rows.append([label, *[_diff_cell(diffs.get(t)) for t in [*tasks, "all"]]])
    return [f"### {runtime}", "", *_table(["pair", *tasks, "all questions"], rows)]


def _md_paired(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for runtime, block in _ok_runtimes(result):
        lines += _md_paired_runtime(runtime, block, result)
    if not lines:
        return []
    intro = (
        "Paired difference in acc on the same questions (mean of per-question differences ± "
        "its standard error); `*`: beyond 1.96 standard errors, i.e. a difference the data "
        "supports at about 95%. Without `*` the two models cannot be told apart here."
    )
    return ["## Paired differences", "", intro, "", *lines]


def _rp(block: dict[str, Any], name: str, key: str, metric: str = "acc") -> float | None:
    value = block["models"][name].get("rp", {}).get(metric, {}).get(key)
    return None if value is None else float(value)


def _md_accuracy_runtime(runtime: str, block: dict[str, Any], result: dict[str, Any]) -> list[str]:
    models = [n for n, e in block["models"].items() if e.get("tasks")]
    if not models:
        return []
    base = block["baseline"]
    cands = [n for n in models if n != base]
    tasks = list(block["models"][models[0]]["tasks"])
    header = ["task", "n", *[_label(result, n) for n in models], *[f"RP {n}" for n in cands]]
    rows = []
    for task in tasks:
        first = block["models"][models[0]]["tasks"][task]
        row = [task, str(first["n"])]
        row += [_acc_cell(block["models"][n]["tasks"][task]) for n in models]
        row += [_num(_rp(block, n, task)) for n in cands]
        rows.append(row)
    avg = ["**average**", ""]
    for n in models:
        avg.append(_pm(*average_accuracy(block["models"][n]["tasks"])))
    avg += [f"**{_num(_rp(block, n, 'average'))}**" for n in cands]
    rows.append(avg)
    notes = [
        f"RP (acc_norm basis) {n}: {_num(_rp(block, n, 'average', 'acc_norm'))}"
        for n in cands
        if block["models"][n].get("rp")
    ]
    return [
        f"### {runtime}",
        "",
        *_table(header, rows),
        *([("; ".join(notes)), ""] if notes else []),
    ]


def _md_accuracy(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for runtime, block in _ok_runtimes(result):
        lines += _md_accuracy_runtime(runtime, block, result)
    if not lines:
        return []
    intro = (
        "acc ± standard error (acc_norm in parentheses where lm-eval defines it). "
        "RP = candidate / baseline "
        "acc per task; the average is mean candidate acc / mean baseline acc."
    )
    return ["## Accuracy", "", intro, "", *lines]


def _md_perplexity(result: dict[str, Any]) -> list[str]:
    rows = [
        [runtime, _label(result, name), _num(e["perplexity"]), _num(e.get("perplexity_ratio"))]
        for runtime, block in _ok_runtimes(result)
        for name, e in block["models"].items()
        if e.get("perplexity") is not None
    ]
    if not rows:
        return []
    cfg = result["config"]
    ppl = cfg["perplexity"]
    note = f"{ppl['data']}, windows of {ppl['seqlen']} tokens (limit {ppl['limit']})"
    return ["## Perplexity", "", note, "", *_table(["runtime", "model", "ppl", "ratio"], rows)]


def _ratio(entry: dict[str, Any]) -> str:
    """The time ratio and, where measured, its 95% interval."""
    ci = entry.get("ratio_ci95")
    if not ci or ci[0] == ci[1]:
        return _num(entry["ratio"])
    return f"{_num(entry['ratio'])} ({_num(ci[0])}–{_num(ci[1])})"


def _md_latency_shape(shape: dict[str, Any], result: dict[str, Any]) -> list[list[str]]:
    key = f"{shape['prompt_length']} × {shape['batch_size']}"
    if "skipped" in shape:
        return [[key, "–", shape["skipped"], *["–"] * 7]]
    rows = []
    for name, pre in shape["prefill"].items():
        dec = shape["decode"][name]
        rows.append(
            [
                key,
                _label(result, name),
                f"{_num(pre['median_ms'], 1)} / {_num(pre['p90_ms'], 1)}",
                _ratio(pre),
                _num(pre["flop_ratio"]),
                f"{_num(dec['median_ms_per_token'], 2)} / {_num(dec['p90_ms_per_token'], 2)}",
                _num(dec["tokens_per_s"], 1),
                _ratio(dec),
                _num(dec["flop_ratio"]),
                _num(shape.get("cuda_peak_mb"), 0) if shape.get("cuda_peak_mb") else "–",
            ]
        )
    return rows


def _md_latency(result: dict[str, Any]) -> list[str]:
    header = [
        "prompt × batch",
        "model",
        "prefill ms (median / p90)",
        "ratio",
        "FLOP-ideal",
        "decode ms/token (median / p90)",
        "tokens/s",
        "ratio",
        "FLOP-ideal",
        "CUDA peak MB",
    ]
    lines: list[str] = []
    for runtime, block in _ok_runtimes(result):
        if block.get("latency"):
            rows = [r for s in block["latency"] for r in _md_latency_shape(s, result)]
            lines += [f"### {runtime}", "", *_table(header, rows)]
    if not lines:
        return []
    cfg = result["config"]
    intro = (
        f"Median of {cfg['repeats']} repeats after {cfg['warmup']} warm-up, all models of a "
        f"runtime interleaved. Decode: {cfg['decode_tokens']} greedy single-token steps with "
        "the KV cache after the prompt, timed per step. ratio = candidate / baseline time "
        "(below 1 is faster), in brackets its 95% bootstrap interval (rounds of the "
        "interleaved run resampled); FLOP-ideal = candidate / baseline forward FLOPs."
    )
    return ["## Latency", "", intro, "", *lines]


def _md_memory(result: dict[str, Any]) -> list[str]:
    rows = []
    for runtime, block in _ok_runtimes(result):
        for name, e in block["models"].items():
            mem = e.get("memory")
            if mem is None:
                continue
            if "error" in mem:
                rows.append([runtime, _label(result, name), f"error: {mem['error']}", *["–"] * 4])
                continue
            rows.append(
                [
                    runtime,
                    _label(result, name),
                    _num(mem["peak_rss_mb"], 1),
                    _num(mem["model_rss_mb"], 1),
                    _num(mem.get("cuda_peak_mb"), 1),
                    _count(result["models"][name].get("params")),
                    _mb(e.get("disk_bytes")),
                ]
            )
    if not rows:
        return []
    header = ["runtime", "model", "peak RSS MB", "peak - start RSS MB", "CUDA peak MB"]
    header += ["params", "artifact on disk"]
    intro = (
        "Each case in a fresh process: load, one prefill and 4 decode steps. peak - start RSS = "
        "peak RSS minus the RSS just before the model was loaded (interpreter and libraries)."
    )
    return ["## Memory", "", intro, "", *_table(header, rows)]


def _md_environment(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return ["## Environment", "", f"- {env['platform']}", f"- {versions}", ""]


def render_markdown(result: dict[str, Any]) -> str:
    """``report.md``: models, runtimes, accuracy with RP, perplexity, latency, memory."""
    sections: list[Callable[[dict[str, Any]], list[str]]] = [
        _md_header,
        _md_models,
        _md_runtimes,
        _md_accuracy,
        _md_paired,
        _md_perplexity,
        _md_latency,
        _md_memory,
        _md_environment,
    ]
    lines = [line for section in sections for line in section(result)]
    plots = [p for p in PLOTS if p in result.get("plots", [])]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: list[float | None]) -> list[float]:
    return [v if v is not None and math.isfinite(v) else 0.0 for v in values]


def _bars(
    ax: Any,
    groups: list[str],
    series: dict[str, list[float | None]],
    digits: int = 2,
    errors: dict[str, list[float | None]] | None = None,
) -> None:
    """Grouped bars: one group per x label, one bar per series; values written above;
    ``errors``: standard errors per series, drawn as error bars."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = _finite(values)
        yerr = _finite((errors or {}).get(label) or [None] * len(values))
        bars = ax.bar(xs, ys, width, label=label, yerr=yerr if any(yerr) else None, capsize=2)
        ax.bar_label(bars, labels=[_num(v, digits) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)


def _legend_below(ax: Any) -> None:
    """The legend under the axes, so it never hides a bar."""
    n = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(n, 3))


def _save(fig: Any, path: Path, plt: Any) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _accuracy_panels(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    panels = []
    for runtime, block in _ok_runtimes(result):
        if any(e.get("tasks") for e in block["models"].values()):
            panels.append(("qa", runtime, block))
        if any(e.get("perplexity") is not None for e in block["models"].values()):
            panels.append(("ppl", runtime, block))
    return panels


def _plot_qa(ax: Any, runtime: str, block: dict[str, Any], result: dict[str, Any]) -> None:
    models = [n for n, e in block["models"].items() if e.get("tasks")]
    tasks = list(block["models"][models[0]]["tasks"])
    series: dict[str, list[float | None]] = {}
    errors: dict[str, list[float | None]] = {}
    for n in models:
        entries = block["models"][n]["tasks"]
        rp = _rp(block, n, "average")
        label = _label(result, n) + ("" if n == block["baseline"] else f"  RP {_num(rp)}")
        mean, mean_se = average_accuracy(entries)
        series[label] = [*[entries[t]["acc"] for t in tasks], mean]
        errors[label] = [*[entries[t].get("acc_stderr") for t in tasks], mean_se]
    _bars(ax, [*tasks, "average"], series, errors=errors)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (acc; bars: ± 1 standard error)")
    ax.set_title(f"QA accuracy, {runtime} (n={block['models'][models[0]]['tasks'][tasks[0]]['n']})")
    _legend_below(ax)
    ax.grid(axis="y", alpha=0.3)


def _plot_ppl(ax: Any, runtime: str, block: dict[str, Any], result: dict[str, Any]) -> None:
    models = [n for n, e in block["models"].items() if e.get("perplexity") is not None]
    values = [block["models"][n]["perplexity"] for n in models]
    bars = ax.bar(range(len(models)), values, color=[f"C{i}" for i in range(len(models))])
    ax.bar_label(bars, labels=[_num(v, 2) for v in values], fontsize=8, padding=1)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([_label(result, n) for n in models], rotation=15, ha="right")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_ylim(0, max(values) * 1.15)
    ax.set_title(f"Perplexity, {runtime}")
    ax.grid(axis="y", alpha=0.3)


def _qa_width(result: dict[str, Any], block: dict[str, Any]) -> float:
    groups = 1 + len(result["config"]["tasks"])
    return max(6.0, 1.0 + groups * (0.45 * len(block["models"]) + 0.4))


def plot_accuracy(result: dict[str, Any], path: Path) -> bool:
    """Grouped bars per task (baseline vs candidates) and perplexity bars, per runtime."""
    panels = _accuracy_panels(result)
    if not panels:
        return False
    plt = _pyplot()
    widths = [_qa_width(result, b) if k == "qa" else 4.5 for k, _, b in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(sum(widths), 4.8),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for ax, (kind, runtime, block) in zip(axes[0], panels, strict=True):
        (_plot_qa if kind == "qa" else _plot_ppl)(ax, runtime, block, result)
    fig.suptitle("lp-deploy bench: accuracy")
    _save(fig, path, plt)
    return True


def _latency_series(
    block: dict[str, Any], baseline: str
) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    groups: list[str] = []
    measured: dict[str, list[float]] = {}
    ideal: dict[str, list[float]] = {}
    for shape in block["latency"]:
        if "skipped" in shape:
            continue
        for phase in ("prefill", "decode"):
            groups.append(f"{phase}\nL={shape['prompt_length']} B={shape['batch_size']}")
            for name, v in shape[phase].items():
                if name != baseline:
                    measured.setdefault(name, []).append(v["ratio"])
                    ideal.setdefault(name, []).append(v["flop_ratio"])
    return groups, measured, ideal


def _latency_style(model: int, ideal: int) -> dict[str, Any]:
    """Measured: solid; FLOP-ideal: hatched outline in the same colour."""
    if ideal:
        return {"facecolor": "white", "edgecolor": f"C{model}", "hatch": "//"}
    return {"color": f"C{model}"}


def _plot_latency_panel(ax: Any, runtime: str, block: dict[str, Any]) -> None:
    groups, measured, ideal = _latency_series(block, block["baseline"])
    width = 0.8 / max(1, 2 * len(measured))
    for i, name in enumerate(measured):
        for j, kind in enumerate(("measured", "FLOP-ideal")):
            values = measured[name] if j == 0 else ideal[name]
            offset = (2 * i + j - (2 * len(measured) - 1) / 2) * width
            xs = [g + offset for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=f"{name}: {kind}", **_latency_style(i, j))
            ax.bar_label(bars, labels=[_num(v, 2) for v in values], fontsize=7, padding=1)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="baseline = 1")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    top = max([1.0, *[v for vs in (*measured.values(), *ideal.values()) for v in vs]])
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("time ratio candidate / baseline")
    ax.set_title(f"Latency ratio, {runtime}")
    _legend_below(ax)
    ax.grid(axis="y", alpha=0.3)


def plot_latency(result: dict[str, Any], path: Path) -> bool:
    """Prefill and decode time ratios per shape next to the FLOP-ideal ratio, per runtime."""
    blocks = [
        (n, b)
        for n, b in _ok_runtimes(result)
        if any("skipped" not in s for s in b.get("latency", []))
    ]
    if not blocks or len(result["models"]) < 2:
        return False
    plt = _pyplot()
    n_groups = max(len(_latency_series(b, b["baseline"])[0]) for _, b in blocks)
    n_bars = 2 * (len(result["models"]) - 1)
    width = max(6.0, n_groups * (0.35 * n_bars + 0.6) + 2)
    fig, axes = plt.subplots(1, len(blocks), figsize=(width * len(blocks), 4.8), squeeze=False)
    for ax, (runtime, block) in zip(axes[0], blocks, strict=True):
        _plot_latency_panel(ax, runtime, block)
    fig.suptitle("lp-deploy bench: latency (below 1 = faster than the baseline)")
    _save(fig, path, plt)
    return True


def _memory_series(
    result: dict[str, Any], key: str
) -> tuple[list[str], dict[str, list[float | None]]]:
    runtimes = [n for n, b in _ok_runtimes(result)]
    series: dict[str, list[float | None]] = {}
    for name in result["models"]:
        values: list[float | None] = []
        for runtime in runtimes:
            entry = result["runtimes"][runtime]["models"].get(name, {})
            mem = entry.get("memory") or {}
            value = entry.get("disk_bytes") if key == "disk" else mem.get(key)
            values.append(value / 2**20 if key == "disk" and value is not None else value)
        series[_label(result, name)] = values
    return runtimes, series


def plot_memory(result: dict[str, Any], path: Path) -> bool:
    """Peak RSS (fresh process), CUDA peak if any, and artifact size per model and runtime."""
    panels = [
        (key, title)
        for key, title in (
            ("peak_rss_mb", "peak RSS (MB)"),
            ("cuda_peak_mb", "peak CUDA memory (MB)"),
            ("disk", "artifact on disk (MB)"),
        )
        if any(v is not None for vs in _memory_series(result, key)[1].values() for v in vs)
    ]
    if not any(k != "disk" for k, _ in panels):
        return False
    plt = _pyplot()
    n_rt = len(_ok_runtimes(result))
    width = max(5.0, 1.0 + n_rt * (0.8 * len(result["models"]) + 0.6))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        groups, series = _memory_series(result, key)
        _bars(ax, groups, series, digits=0 if key != "disk" else 1)
        top = max([v for vs in series.values() for v in vs if v is not None] or [1.0])
        ax.set_ylim(0, top * 1.15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        _legend_below(ax)
    fig.suptitle("lp-deploy bench: memory")
    _save(fig, path, plt)
    return True


# --------------------------------------------------------------------------- publish


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.tmp-", dir=out))
    try:
        plotters = {"accuracy.png": plot_accuracy, "latency.png": plot_latency}
        plotters["memory.png"] = plot_memory
        result["plots"] = [name for name, fn in plotters.items() if fn(result, tmp / name)]
        data = clean_json(result)
        (tmp / "report.md").write_text(render_markdown(data))
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        written = [*result["plots"], "report.md", "report.json"]
        for stale in set(PLOTS) - set(result["plots"]):
            (out / stale).unlink(missing_ok=True)
        for name in written:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in written]
