"""Stage ``bench``: a baseline against patched candidates on one or more runtimes.

Per (model, runtime): perplexity through the runtime's ``forward`` and zero-shot QA through
its ``loglikelihood`` (retained performance = candidate / baseline), prefill and decode
latency (all models of a runtime interleaved in one measurement per shape, ratios next to
the FLOP-ideal ratio), and peak memory measured in a fresh process per case. The result is
written by :mod:`lp_deploy.benchmarks.report` (``report.json``, ``report.md``, plots).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lp_deploy.artifacts import (
    CONFIG_FILE,
    META_KEY,
    Artifact,
    Kind,
    check_out,
    dir_kind,
    foreign_files,
    inspect_artifact,
    write_manifest,
)
from lp_deploy.benchmarks.flops import FlopProfile, profile_config_dir, profile_model
from lp_deploy.benchmarks.latency import Timing, measure_interleaved, ratio_interval, ratios
from lp_deploy.benchmarks.memory import measure_subprocess
from lp_deploy.benchmarks.qa import (
    TASKS,
    LoglikelihoodFn,
    Metric,
    Request,
    TaskResult,
    evaluate_tasks,
    paired_differences,
    retained_performance,
)
from lp_deploy.benchmarks.qa_pool import ScoringPool
from lp_deploy.benchmarks.sweep import STDERR
from lp_deploy.data import data_file
from lp_deploy.errors import LpDeployError
from lp_deploy.perplexity import LogitsFn, PerplexitySpec, perplexity_of
from lp_deploy.runtimes import Runtime, create_runtime, runtime_spec, unavailable_reason
from lp_deploy.sources import alias_dir

log = logging.getLogger(__name__)

METRICS: tuple[Metric, ...] = ("acc", "acc_norm")
Sync = Callable[[], None]


@dataclass
class BenchConfig:
    """Options of ``lp-deploy bench``."""

    candidates: Sequence[str | Path]
    out: Path
    baseline: str | None = None  # default: the source model of the first candidate
    runtimes: Sequence[str] = ("torch",)
    tasks: Sequence[str] = ()
    limit: int | None = None
    perplexity: PerplexitySpec | None = None
    latency: bool = False
    memory: bool = False
    prompt_lengths: Sequence[int] = (128, 512, 2048)
    decode_tokens: int = 32
    batch_sizes: Sequence[int] = (1,)
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    data_dir: Path | None = None
    device: str = "cpu"
    eval_batch_size: int = 8  # QA log-likelihood batch
    qa_workers: int = 1  # QA scoring processes (one runtime each)
    memory_prompt_length: int = 128
    progress: bool = True
    command: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One model of the bench: a display name, its role and where it comes from."""

    name: str
    role: str  # "baseline" or "candidate"
    source: str


@dataclass
class _Loaded:
    """Runtimes of one kind that loaded, by model name, with their artifacts."""

    runtimes: dict[str, Runtime] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- configuration


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``'piqa,arc_easy'`` or ``'all'`` -> task names; a clear error for an unknown one."""
    if spec is None:
        return []
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [t for t in names if t]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise LpDeployError(f"unknown QA task(s) {unknown}; choose from {', '.join(TASKS)} or all")
    return names


def normalize_runtimes(names: Sequence[str]) -> list[str]:
    """Canonical runtime names (``ort`` -> ``onnxruntime``), de-duplicated, in order."""
    out: list[str] = []
    for name in names:
        canon = runtime_spec(name).name
        if canon not in out:
            out.append(canon)
    if not out:
        raise LpDeployError("give at least one runtime")
    return out


def _positive(name: str, values: Sequence[int], minimum: int = 1) -> None:
    bad = [v for v in values if v < minimum]
    if bad:
        raise LpDeployError(f"{name} must be >= {minimum}, got {bad}")


def _check_numbers(cfg: BenchConfig) -> None:
    _positive("--prompt-lengths", cfg.prompt_lengths)
    _positive("--batch-sizes", cfg.batch_sizes)
    _positive("--decode-tokens", [cfg.decode_tokens])
    _positive("--repeats", [cfg.repeats])
    _positive("--warmup", [cfg.warmup], 0)
    _positive("--eval-batch-size", [cfg.eval_batch_size])
    _positive("--qa-workers", [cfg.qa_workers])
    ppl = cfg.perplexity
    if ppl is not None:
        _positive("--ppl-seqlen", [ppl.seqlen], 2)
    for name, value in (("--limit", cfg.limit), ("--ppl-limit", ppl.limit if ppl else None)):
        if value is not None:
            _positive(name, [value])
    if cfg.threads is not None:
        _positive("--threads", [cfg.threads])


def _check_candidates(cfg: BenchConfig) -> None:
    if not cfg.candidates:
        raise LpDeployError("give at least one --candidate directory")
    for cand in cfg.candidates:
        path = Path(cand).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise LpDeployError(
                f"candidate {path} {what}; pass a checkpoint written by 'lp-deploy patch' / "
                "'lp-deploy fold' or an 'lp-deploy export onnx' directory"
            )
        if not (path / CONFIG_FILE).is_file():
            raise LpDeployError(f"candidate {path} has no {CONFIG_FILE}; it is not a model dir")


def resolve_ppl(spec: PerplexitySpec, data_dir: Path | None) -> PerplexitySpec:
    """``spec`` with its text resolved by the data-dir rule (``hf:`` specs as they are)."""
    if spec.data.startswith("hf:"):
        return spec
    return dataclasses.replace(spec, data=str(data_file(spec.data, data_dir)))


def check_config(cfg: BenchConfig) -> BenchConfig:
    """Validate and normalise ``cfg`` (raises :class:`LpDeployError` with the fix)."""
    _check_candidates(cfg)
    _check_numbers(cfg)
    cfg.runtimes = normalize_runtimes(cfg.runtimes)
    cfg.tasks = parse_tasks(cfg.tasks)
    cfg.out = check_out(cfg.out, Kind.REPORT, cfg.overwrite)
    clash = [f for f in foreign_files(cfg.out, Kind.REPORT) if _report_file(f)]
    if clash:
        raise LpDeployError(
            f"--out {cfg.out} holds {', '.join(clash)}, which lp-deploy did not write and "
            "the report would replace; choose another directory"
        )
    if cfg.perplexity:
        cfg.perplexity = resolve_ppl(cfg.perplexity, cfg.data_dir)
    if cfg.baseline is None:
        cfg.baseline = default_baseline(Path(cfg.candidates[0]))
    return cfg


def _report_file(name: str) -> bool:
    from lp_deploy.benchmarks.report import PLOTS

    return name in ("report.json", "report.md", *PLOTS) or name.startswith("artifacts/")


def read_lp_meta(path: str | Path) -> dict[str, Any]:
    """The ``lp_deploy`` metadata of a model source ({} when it has none or is unreadable)."""
    try:
        return inspect_artifact(path).meta
    except LpDeployError:
        return {}


def default_baseline(candidate: Path) -> str:
    """The source model recorded in a candidate's metadata (``meta['source']['source']``)."""
    source = read_lp_meta(candidate).get("source")
    name = source.get("source") if isinstance(source, dict) else None
    if not name:
        raise LpDeployError(
            f"{candidate} records no source model in its '{META_KEY}' metadata; pass --baseline"
        )
    return str(name)


def model_specs(cfg: BenchConfig) -> list[ModelSpec]:
    """Baseline first, then the candidates, each with a unique display name."""
    assert cfg.baseline is not None
    raw = [("baseline", str(cfg.baseline))] + [("candidate", str(c)) for c in cfg.candidates]
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for role, source in raw:
        base = _display_name(source)
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        specs.append(ModelSpec(name, role, source))
    return specs


def _display_name(source: str) -> str:
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve().name
    return source.replace("/", "--")


# --------------------------------------------------------------------------- artifacts


def is_onnx_dir(path: str | Path) -> bool:
    """Whether ``path`` is an ``lp-deploy export onnx`` directory."""
    path = Path(path).expanduser()
    return path.is_dir() and dir_kind(path) == Kind.ONNX


def onnx_artifact(spec: ModelSpec, out: Path) -> Path:
    """An ONNX export of ``spec``: its own dir if it is one, else ``out/artifacts/<name>-onnx``
    (exported now with the ONNX exporter, or reused when already there)."""
    if is_onnx_dir(spec.source):
        return Path(spec.source).expanduser()
    target = out / "artifacts" / f"{spec.name}-onnx"
    if is_onnx_dir(target):
        log.info("reusing the ONNX export %s", target)
        return target
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx

    log.info("exporting %s to ONNX (%s)", spec.name, target)
    return export_onnx(OnnxExportConfig(model=spec.source, out=target)).out


def disk_bytes(source: str | Path) -> int | None:
    """Bytes on disk of a model file or directory (an alias: its cached copy); None if unknown."""
    try:
        artifact: Artifact | None = inspect_artifact(source)
    except LpDeployError:
        artifact = None
    if artifact is not None and artifact.kind == Kind.ALIAS:
        return disk_bytes(alias_dir(str(source)))
    path = Path(str(source)).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def runtime_options(runtime: str, cfg: BenchConfig) -> dict[str, Any]:
    """``create_runtime`` options for ``runtime``: threads, and the device for PyTorch."""
    opts: dict[str, Any] = {}
    if cfg.threads:
        opts["threads"] = cfg.threads
    if runtime == "torch":
        opts["device"] = cfg.device
    return opts


# --------------------------------------------------------------------------- accuracy


def logits_fn(rt: Runtime) -> LogitsFn:
    """Logits of full windows through ``rt.forward`` (no past)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        batch, n = ids.shape
        mask = torch.ones(batch, n, dtype=torch.long)
        logits, _ = rt.forward(ids, mask, torch.arange(n).expand(batch, n), None)
        return logits

    return fn


def loglikelihood_fn(rt: Runtime, batch_size: int = 1) -> LoglikelihoodFn:
    """QA scoring through ``rt.loglikelihood`` (the sums; the greedy flags are dropped)."""

    def fn(requests: Sequence[Request]) -> list[float]:
        pairs = [(r.context, r.continuation) for r in requests]
        return [lp for lp, _ in rt.loglikelihood(pairs, batch_size)]

    return fn


def _qa_scores(
    rt: Runtime, cfg: BenchConfig, label: str, source: tuple[str, str]
) -> dict[str, TaskResult]:
    """The QA tasks through ``rt``, or through ``cfg.qa_workers`` processes that each load
    ``source`` (runtime kind, artifact) anew."""
    if cfg.qa_workers == 1:
        ll = loglikelihood_fn(rt, cfg.eval_batch_size)
        return evaluate_tasks(cfg.tasks, ll, cfg.data_dir, cfg.limit, cfg.progress)
    kind, artifact = source
    log.info("%s: scoring QA in %d processes", label, cfg.qa_workers)
    options = runtime_options(kind, cfg)
    with ScoringPool(kind, artifact, cfg.qa_workers, cfg.eval_batch_size, options) as pool:
        return evaluate_tasks(cfg.tasks, pool, cfg.data_dir, cfg.limit, cfg.progress)


def _accuracy(
    rt: Runtime,
    cfg: BenchConfig,
    windows: torch.Tensor | None,
    label: str,
    source: tuple[str, str],
) -> tuple[dict[str, Any], dict[str, TaskResult]]:
    out: dict[str, Any] = {}
    if windows is not None:
        t0 = time.perf_counter()
        out["perplexity"] = perplexity_of(
            logits_fn(rt), windows, progress=cfg.progress, desc=f"ppl {label}"
        )
        out["perplexity_seconds"] = round(time.perf_counter() - t0, 2)
    results: dict[str, TaskResult] = {}
    if cfg.tasks:
        t0 = time.perf_counter()
        results = _qa_scores(rt, cfg, label, source)
        out["tasks"] = {t: asdict(r) for t, r in results.items()}
        out["qa_seconds"] = round(time.perf_counter() - t0, 2)
    return out, results


def _retained(
    results: dict[str, dict[str, TaskResult]], baseline: str
) -> dict[str, dict[str, dict[str, float]]]:
    """RP per model (the baseline included: exactly 1 where its metric is not 0), per metric."""
    base = results.get(baseline)
    if not base:
        return {}
    return {
        name: {m: retained_performance(res, base, m) for m in METRICS}
        for name, res in results.items()
    }


def _paired(results: dict[str, dict[str, TaskResult]]) -> dict[str, dict[str, Any]]:
    """Per model, per other model: the paired difference (acc) on the same questions, per
    task and pooled (``"all"``)."""
    return {
        name: {
            other: {t: asdict(d) for t, d in paired_differences(res, ores).items()}
            for other, ores in results.items()
            if other != name
        }
        for name, res in results.items()
    }


# --------------------------------------------------------------------------- latency


def _random_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length * 1000 + batch)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def _prefill(rt: Runtime, ids: torch.Tensor) -> None:
    batch, n = ids.shape
    mask = torch.ones(batch, n, dtype=torch.long)
    rt.forward(ids, mask, torch.arange(n).expand(batch, n), None)


class DecodeCase:
    """``steps`` greedy single-token steps with the KV cache after a fixed prompt.

    The prompt is prefilled once (untimed); each call replays the steps from that cache and
    records every step's time, so per-token statistics come out of the same interleaved run.
    """

    def __init__(self, rt: Runtime, ids: torch.Tensor, steps: int, sync: Sync | None) -> None:
        self.rt, self.steps, self.sync = rt, steps, sync
        self.batch, self.length = ids.shape
        mask = torch.ones(self.batch, self.length, dtype=torch.long)
        pos = torch.arange(self.length).expand(self.batch, self.length)
        self.logits, self.past = rt.forward(ids, mask, pos, None)
        self.calls: list[list[float]] = []

    def __call__(self) -> None:
        logits, past, times = self.logits, self.past, []
        for k in range(self.steps):
            n = self.length + k
            token = logits[:, -1].argmax(-1, keepdim=True).cpu()
            mask = torch.ones(self.batch, n + 1, dtype=torch.long)
            pos = torch.full((self.batch, 1), n, dtype=torch.long)
            if self.sync:
                self.sync()
            start = time.perf_counter()
            logits, past = self.rt.forward(token, mask, pos, past)
            if self.sync:
                self.sync()
            times.append(time.perf_counter() - start)
        self.calls.append(times)


def _sync_fn() -> Sync | None:
    return torch.cuda.synchronize if torch.cuda.is_available() else None


def _cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _prefill_block(
    timings: dict[str, Timing],
    baseline: str,
    flops: dict[str, FlopProfile],
    batch: int,
    length: int,
) -> dict[str, Any]:
    rel = ratios(timings, baseline)
    base_flops = flops[baseline].prefill(length)
    base_rounds = [[x] for x in timings[baseline].samples]
    return {
        name: {
            **t.to_dict(),
            "tokens_per_s": batch * length / t.median,
            "ratio": rel[name],
            "ratio_ci95": list(ratio_interval([[x] for x in t.samples], base_rounds)),
            "flop_ratio": flops[name].prefill(length) / base_flops,
        }
        for name, t in timings.items()
    }


def _decode_block(
    rounds: dict[str, list[list[float]]],
    baseline: str,
    flops: dict[str, FlopProfile],
    batch: int,
    length: int,
    steps: int,
) -> dict[str, Any]:
    """Per-token statistics; ``rounds[name]`` holds the step times of each timed call."""
    timings = {n: Timing(tuple(x for call in calls for x in call)) for n, calls in rounds.items()}
    rel = ratios(timings, baseline)
    base_flops = flops[baseline].decode(length, steps)
    return {
        name: {
            "median_ms_per_token": t.median * 1e3,
            "p90_ms_per_token": t.p90 * 1e3,
            "mean_ms_per_token": t.mean * 1e3,
            "n": len(t.samples),
            "tokens_per_s": batch / t.median,
            "ratio": rel[name],
            "ratio_ci95": list(ratio_interval(rounds[name], rounds[baseline])),
            "flop_ratio": flops[name].decode(length, steps) / base_flops,
        }
        for name, t in timings.items()
    }


def _latency_shape(
    loaded: dict[str, Runtime],
    baseline: str,
    flops: dict[str, FlopProfile],
    cfg: BenchConfig,
    batch: int,
    length: int,
) -> dict[str, Any]:
    vocab = min(len(rt.tokenizer) for rt in loaded.values())
    ids = _random_ids(vocab, batch, length)
    sync = _sync_fn()
    _cuda_peak_reset()
    prefill = measure_interleaved(
        {n: partial(_prefill, rt, ids) for n, rt in loaded.items()},
        cfg.repeats,
        cfg.warmup,
        sync,
    )
    cases = {n: DecodeCase(rt, ids, cfg.decode_tokens, sync) for n, rt in loaded.items()}
    measure_interleaved(cases, cfg.repeats, cfg.warmup, sync)
    rounds = {n: c.calls[cfg.warmup :] for n, c in cases.items()}
    return {
        "prompt_length": length,
        "batch_size": batch,
        "decode_tokens": cfg.decode_tokens,
        "prefill": _prefill_block(prefill, baseline, flops, batch, length),
        "decode": _decode_block(rounds, baseline, flops, batch, length, cfg.decode_tokens),
        "cuda_peak_mb": _cuda_peak_mb(),
    }


def measure_latency(
    loaded: dict[str, Runtime],
    baseline: str,
    flops: dict[str, FlopProfile],
    cfg: BenchConfig,
) -> list[dict[str, Any]]:
    """One interleaved prefill and decode measurement per (prompt length, batch size)."""
    max_len = min(rt.max_length for rt in loaded.values())
    shapes: list[dict[str, Any]] = []
    for length in cfg.prompt_lengths:
        for batch in cfg.batch_sizes:
            if length + cfg.decode_tokens > max_len:
                shapes.append(
                    {
                        "prompt_length": length,
                        "batch_size": batch,
                        "skipped": f"prompt + decode tokens exceed the {max_len}-token context",
                    }
                )
                continue
            log.info("latency: prompt %d, batch %d", length, batch)
            shapes.append(_latency_shape(loaded, baseline, flops, cfg, batch, length))
    return shapes


# --------------------------------------------------------------------------- one runtime


def _profile(rt: Runtime, artifact: str) -> FlopProfile:
    from lp_deploy.runtimes.torch_runtime import TorchRuntime

    if isinstance(rt, TorchRuntime):
        return profile_model(rt.model)
    return profile_config_dir(artifact)


def _load_all(
    runtime: str, specs: list[ModelSpec], cfg: BenchConfig, block: dict[str, Any]
) -> _Loaded:
    """Load every model on ``runtime``; failures are recorded in ``block``, not raised."""
    loaded = _Loaded()
    for spec in specs:
        entry = block["models"].setdefault(spec.name, {})
        try:
            artifact = (
                str(onnx_artifact(spec, cfg.out))
                if runtime_spec(runtime).runs_onnx
                else spec.source
            )
            entry["artifact"] = artifact
            entry["disk_bytes"] = disk_bytes(artifact)
            log.info("%s: loading %s", runtime, spec.name)
            loaded.runtimes[spec.name] = create_runtime(
                runtime, artifact, **runtime_options(runtime, cfg)
            )
            loaded.artifacts[spec.name] = artifact
        except (LpDeployError, OSError) as exc:
            entry["error"] = str(exc)
            log.warning("%s: %s failed: %s", runtime, spec.name, exc)
    return loaded


def _skip(block: dict[str, Any], reason: str) -> dict[str, Any]:
    block.update(status="skipped", reason=reason)
    log.warning("skipping runtime %s: %s", block["runtime"], reason)
    return block


def _evaluate_all(
    loaded: _Loaded, block: dict[str, Any], cfg: BenchConfig, windows: torch.Tensor | None
) -> None:
    results: dict[str, dict[str, TaskResult]] = {}
    for name, rt in loaded.runtimes.items():
        log.info("%s: accuracy of %s", block["runtime"], name)
        label = f"{name}/{block['runtime']}"
        source = (block["runtime"], loaded.artifacts[name])
        acc, results[name] = _accuracy(rt, cfg, windows, label, source)
        block["models"][name].update(acc)
    baseline = block["baseline"]
    for name, rp in _retained({k: v for k, v in results.items() if v}, baseline).items():
        block["models"][name]["rp"] = rp
    for name, paired in _paired({k: v for k, v in results.items() if v}).items():
        block["models"][name]["paired"] = paired
    base_ppl = block["models"][baseline].get("perplexity")
    for entry in block["models"].values():
        if base_ppl and entry.get("perplexity") is not None:
            entry["perplexity_ratio"] = entry["perplexity"] / base_ppl


def _measure_memory(loaded: _Loaded, block: dict[str, Any], cfg: BenchConfig) -> None:
    runtime = block["runtime"]
    length = min(cfg.memory_prompt_length, *(rt.max_length - 8 for rt in loaded.runtimes.values()))
    artifacts = dict(loaded.artifacts)
    loaded.runtimes.clear()
    gc.collect()
    for name, artifact in artifacts.items():
        log.info("%s: peak memory of %s (fresh process)", runtime, name)
        block["models"][name]["memory"] = measure_subprocess(
            runtime, artifact, max(1, length), 4, 1, runtime_options(runtime, cfg)
        )


def bench_runtime(
    runtime: str,
    specs: list[ModelSpec],
    cfg: BenchConfig,
    windows: Callable[[Runtime], torch.Tensor | None],
    flops: dict[str, FlopProfile],
) -> dict[str, Any]:
    """Everything measured on one runtime; a runtime that cannot run is recorded as skipped."""
    baseline = specs[0].name
    block: dict[str, Any] = {"runtime": runtime, "status": "ok", "reason": None}
    block.update(baseline=baseline, models={}, latency=[])
    reason = unavailable_reason(runtime)
    if reason:
        return _skip(block, reason)
    loaded = _load_all(runtime, specs, cfg, block)
    if baseline not in loaded.runtimes:
        return _skip(block, f"the baseline failed: {block['models'][baseline].get('error')}")
    for name, rt in loaded.runtimes.items():
        if name not in flops:
            flops[name] = _profile(rt, loaded.artifacts[name])
    if cfg.tasks or cfg.perplexity:
        _evaluate_all(loaded, block, cfg, windows(loaded.runtimes[baseline]))
    if cfg.latency:
        block["latency"] = measure_latency(loaded.runtimes, baseline, flops, cfg)
    if cfg.memory:
        _measure_memory(loaded, block, cfg)
    loaded.runtimes.clear()
    gc.collect()
    return block


# --------------------------------------------------------------------------- entry point


def _window_source(cfg: BenchConfig) -> Callable[[Runtime], torch.Tensor | None]:
    """Perplexity windows, tokenised once with the first baseline runtime's tokenizer."""
    cache: dict[str, torch.Tensor] = {}

    def get(rt: Runtime) -> torch.Tensor | None:
        if cfg.perplexity is None:
            return None
        if "w" not in cache:
            cache["w"] = cfg.perplexity.windows(rt.tokenizer)
        return cache["w"]

    return get


def _model_entry(spec: ModelSpec, flops: FlopProfile | None, cfg: BenchConfig) -> dict[str, Any]:
    meta = read_lp_meta(spec.source)
    plan = meta.get("plan") or {}
    entry: dict[str, Any] = {
        "role": spec.role,
        "source": spec.source,
        "removed": plan.get("removed"),
        "patch": (meta.get("patch") or {}).get("kind"),
        "fold": meta.get("fold"),
        "disk_bytes": disk_bytes(spec.source),
    }
    if flops is not None:
        entry.update(
            layers=flops.layers,
            params=flops.params,
            flops=flops.to_dict(),
            flops_per_token={str(n): flops.per_token(n) for n in cfg.prompt_lengths},
        )
    return entry


def _config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(cfg).items()
    }


@dataclass
class BenchResult:
    """The report directory and the report's data (``report.json``)."""

    out: Path
    data: dict[str, Any]

    @property
    def plots(self) -> list[str]:
        return list(self.data.get("plots", []))


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the bench and write the report into ``cfg.out`` (the ``--out`` rule of a report:
    a new directory or an earlier report, whose exported artifacts are reused)."""
    from lp_deploy.benchmarks.report import environment, write_report

    started = time.perf_counter()
    cfg = check_config(cfg)
    specs = model_specs(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    flops: dict[str, FlopProfile] = {}
    windows = _window_source(cfg)
    blocks = {rt: bench_runtime(rt, specs, cfg, windows, flops) for rt in cfg.runtimes}
    if all(b["status"] != "ok" for b in blocks.values()):
        reasons = "; ".join(f"{n}: {b['reason']}" for n, b in blocks.items())
        raise LpDeployError(f"no runtime could run the bench ({reasons})")
    result = {
        "schema": "lp-deploy-bench/1",
        "config": _config_dict(cfg),
        "environment": environment(cfg.threads, cfg.command, cfg.device),
        "baseline": specs[0].name,
        "models": {s.name: _model_entry(s, flops.get(s.name), cfg) for s in specs},
        "runtimes": blocks,
        "seconds": round(time.perf_counter() - started, 1),
    }
    written = write_report(result, cfg.out)
    ours = {str(p.relative_to(cfg.out)) for p in written}
    exported = (cfg.out / "artifacts").rglob("*")
    ours |= {str(p.relative_to(cfg.out)) for p in exported if p.is_file()}
    write_manifest(cfg.out, Kind.REPORT, sorted(ours))
    return BenchResult(cfg.out, result)


# --------------------------------------------------------------------------- sweep hook


def qa_evaluator(
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Callable[[Any, Any], dict[str, float]]:
    """A ``run_sweep`` evaluator: QA accuracy of an in-memory model via a ``TorchRuntime``
    (each task's and the average's, each with its standard error under ``..._stderr``)."""
    from lp_deploy.benchmarks.report import average_accuracy
    from lp_deploy.runtimes.torch_runtime import TorchRuntime

    names = parse_tasks(tasks)

    def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        rt = TorchRuntime(model, tokenizer, device=device)
        ll = loglikelihood_fn(rt, batch_size)
        results = evaluate_tasks(names, ll, data_dir, limit, progress)
        metrics: dict[str, float] = {}
        for t, r in results.items():
            metrics.update({f"acc_{t}": r.acc, f"acc_{t}{STDERR}": r.acc_stderr})
        done = {t: asdict(r) for t, r in results.items() if not math.isnan(r.acc)}
        if len(results) > 1 and done:
            mean, se = average_accuracy(done)
            metrics.update({"acc_avg": mean, f"acc_avg{STDERR}": math.nan if se is None else se})
        return metrics

    return evaluate
