"""Peak RSS of the calibration pass for several sample counts (each in a fresh process).

``python -m lp_deploy.benchmarks.calib_memory --samples 32 128`` prints one JSON line per
count and their ratio; statistics are streamed, so the peak should not grow with samples.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
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


def main(argv: list[str] | None = None) -> int:
    """Run each sample count in a subprocess; print the results and the peak-RSS ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--calib", default="wikitext-2/valid.txt")
    p.add_argument("--samples", type=int, nargs="+", default=[32, 128])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lstsq", default=None, help="START:END: the least-squares pass of that gap")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
