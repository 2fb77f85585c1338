"""Peak RSS of the calibration pass for several sample counts (each in a fresh process).

``python -m lp_deploy.benchmarks.calib_memory --samples 32 128`` prints one JSON line per
count and their ratio; statistics are streamed, so the peak should not grow with samples.

``--offload-compare`` instead calibrates one model directory twice on the same windows, in
memory and layer-streamed (:mod:`lp_deploy.offload`), each in a fresh process (plus one that
only imports, the interpreter's own share), and prints peak RSS, seconds and the largest
relative difference between the two statistics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lp_deploy.aliases import DEFAULT_MODEL


def measure_once(
    model: str, calib: str, samples: int, seqlen: int, lstsq: str | None = None
) -> dict[str, Any]:
    """Load, calibrate, return peak RSS (this process) and timings. ``lstsq="START:END"``
    measures the least-squares pass instead (both sites of that gap)."""
    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.loading import load_model
    from lp_deploy.stats import collect_gram, collect_stats

    loaded = load_model(model)
    windows = CalibrationSpec(calib, samples, seqlen, seed=0).windows(loaded.tokenizer)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if lstsq is not None:
        a, b = (int(x) for x in lstsq.split(":"))
        gram = collect_gram(loaded.adapter, windows, [("input", a, b), ("mlp", a, b)], 1, False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "samples": samples,
            "seqlen": seqlen,
            "tokens": next(iter(gram.values())).n_tokens,
            "pass": f"lstsq {lstsq}",
            "peak_rss_mb": peak / 1024,
            "rss_after_load_mb": rss_loaded / 1024,
            "seconds": round(time.perf_counter() - start, 1),
        }
    stats = collect_stats(loaded.adapter, windows, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "samples": samples,
        "seqlen": seqlen,
        "tokens": stats.n_tokens,
        "peak_rss_mb": peak / 1024,
        "rss_after_load_mb": rss_loaded / 1024,
        "calibration_s": round(time.perf_counter() - start, 1),
    }


MODES = ("imports", "memory", "offload")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Largest anonymous and file-backed resident memory seen (``/proc/self/status``
    ``RssAnon`` / ``RssFile``, sampled every ``period`` s; Linux only, else empty).
    Memory-mapped safetensors pages are file-backed: counted by ``ru_maxrss``, yet clean
    pages the kernel may drop under pressure."""

    def __init__(self, period: float = 0.02) -> None:
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _sample(self) -> None:
        status = Path("/proc/self/status")
        if not status.is_file():
            return
        for line in status.read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                mb = int(line.split()[1]) / 1024
                self.peak[key] = max(self.peak.get(key, 0.0), mb)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure_mode(
    model: str, calib: str, samples: int, seqlen: int, mode: str, stats_out: Path | None
) -> dict[str, Any]:
    """One calibration of ``model`` (a safetensors directory) in this process: ``memory``
    (loaded whole, :func:`collect_stats`), ``offload`` (:func:`streamed_stats`) or
    ``imports`` (nothing but the imports both need); statistics saved to ``stats_out``.
    Besides ``ru_maxrss``: the largest ``RssAnon`` / ``RssFile`` sampled (:class:`RssSampler`)."""
    for name in ("transformers", "lp_deploy.loading", "lp_deploy.offload", "lp_deploy.stats"):
        importlib.import_module(name)
    row: dict[str, Any] = {"mode": mode, "samples": samples, "seqlen": seqlen}
    if mode == "imports":
        return {**row, "peak_rss_mb": round(_peak_mb(), 1)}
    with RssSampler() as sampler:
        stats = _calibrate(model, calib, samples, seqlen, mode, row)
    row["peak_rss_mb"] = round(_peak_mb(), 1)
    row.update({f"peak_{k}_mb": round(v, 1) for k, v in sampler.peak.items()})
    if stats_out is not None:
        stats.save(stats_out)
    return row


def _calibrate(model: str, calib: str, samples: int, seqlen: int, mode: str, row: Any) -> Any:
    from transformers import AutoTokenizer

    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.loading import load_model
    from lp_deploy.offload import streamed_stats
    from lp_deploy.stats import collect_stats

    if mode == "memory":
        loaded = load_model(model)
        windows = CalibrationSpec(calib, samples, seqlen, seed=0).windows(loaded.tokenizer)
        row["rss_after_load_mb"] = round(_peak_mb(), 1)
        start = time.perf_counter()
        stats = collect_stats(loaded.adapter, windows, progress=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        windows = CalibrationSpec(calib, samples, seqlen, seed=0).windows(tokenizer)
        start = time.perf_counter()
        stats = streamed_stats(Path(model), windows, progress=False)
    row["calibration_s"] = round(time.perf_counter() - start, 1)
    return stats


def _max_rel(a: Any, b: Any) -> float:
    """Largest relative difference over the three sums (max |a - b| / max |b| each)."""
    pairs = [(a.cos_sum, b.cos_sum), (a.abs_sum, b.abs_sum)]
    if a.abs_rot_sum is not None and b.abs_rot_sum is not None:
        pairs.append((a.abs_rot_sum, b.abs_rot_sum))
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in pairs)


def offload_compare(model: str, calib: str, samples: int, seqlen: int) -> dict[str, Any]:
    """In-memory vs layer-streamed calibration, each in a child process; the goal is the
    issue's: offload peak < weights / 3 + the calibration batch's hidden states."""
    import torch

    from lp_deploy.offload import weights_bytes
    from lp_deploy.stats import ActivationStats

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = Path(tmp) / f"{mode}.safetensors"
            cmd = [sys.executable, "-m", "lp_deploy.benchmarks.calib_memory", "--child-mode"]
            cmd += [mode, "--stats-out", str(out), "--model", model, "--calib", calib]
            cmd += ["--samples", str(samples), "--seqlen", str(seqlen)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[mode]), flush=True)
        memory = ActivationStats.load(Path(tmp) / "memory.safetensors")
        offload = ActivationStats.load(Path(tmp) / "offload.safetensors")
    d = memory.abs_sum.shape[1]
    weights_mb = weights_bytes(Path(model)) / 2**20
    states_mb = samples * seqlen * d * torch.finfo(torch.float32).bits / 8 / 2**20
    goal_mb = weights_mb / 3 + states_mb
    return {
        "weights_mb": round(weights_mb, 1),
        "batch_states_mb": round(states_mb, 1),
        "goal_mb": round(goal_mb, 1),
        "memory_peak_mb": rows["memory"]["peak_rss_mb"],
        "offload_peak_mb": rows["offload"]["peak_rss_mb"],
        "imports_peak_mb": rows["imports"]["peak_rss_mb"],
        "offload_meets_goal": rows["offload"]["peak_rss_mb"] < goal_mb,
        "peak_ratio_offload_vs_memory": round(
            rows["offload"]["peak_rss_mb"] / rows["memory"]["peak_rss_mb"], 4
        ),
        "max_rel_diff": _max_rel(offload, memory),
    }


def main(argv: list[str] | None = None) -> int:
    """Run each sample count in a subprocess; print the results and the peak-RSS ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--calib", default="wikitext-2/valid.txt")
    p.add_argument("--samples", type=int, nargs="+", default=[32, 128])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lstsq", default=None, help="START:END: the least-squares pass of that gap")
    p.add_argument(
        "--offload-compare",
        action="store_true",
        help="in-memory vs layer-streamed calibration of --model (a safetensors directory)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--stats-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_mode:
        n = args.samples[0]
        row = measure_mode(args.model, args.calib, n, args.seqlen, args.child_mode, args.stats_out)
        print(json.dumps(row))
        return 0
    if args.offload_compare:
        print(json.dumps(offload_compare(args.model, args.calib, args.samples[0], args.seqlen)))
        return 0
    if args.child:
        row = measure_once(args.model, args.calib, args.samples[0], args.seqlen, args.lstsq)
        print(json.dumps(row))
        return 0
    rows = []
    for n in args.samples:
        cmd = [
            sys.executable,
            "-m",
            "lp_deploy.benchmarks.calib_memory",
            "--child",
            "--model",
            args.model,
            "--calib",
            args.calib,
            "--samples",
            str(n),
            "--seqlen",
            str(args.seqlen),
            *(["--lstsq", args.lstsq] if args.lstsq else []),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    first, last = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    print(json.dumps({"peak_rss_ratio_last_vs_first": round(last / first, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
