"""Calibration overhead: the statistics pass over the same windows as a plain forward pass,
interleaved window by window in one process.

``python -m lp_deploy.benchmarks.calib_overhead --samples 16`` prints one JSON line: seconds
per mode, the ratios to the plain forward pass (goal <= 1.1 for ``device``), and the largest
relative difference of the statistics between the device reduction and the float64 reference
(``reference``: every boundary's states copied out and reduced in float64, the former path).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from lp_deploy.aliases import DEFAULT_MODEL


def _reference_pass(adapter: Any, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from lp_deploy.hadamard import is_supported
    from lp_deploy.stats import _Recorder, _reduce

    recorder = _Recorder([*adapter.layers, adapter.final_norm])
    try:
        adapter.backbone(input_ids=window, use_cache=False)
        d = adapter.hidden_size
        states = torch.stack([s.reshape(-1, d).cpu() for s in recorder.states if s is not None])
    finally:
        recorder.close()
    cos, abs_, rot = _reduce(states, is_supported(d))
    return (cos, abs_) if rot is None else (cos, abs_, rot)


def _device_pass(adapter: Any, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from lp_deploy.stats import collect_stats

    s = collect_stats(adapter, window, progress=False)
    return (
        (s.cos_sum, s.abs_sum) if s.abs_rot_sum is None else (s.cos_sum, s.abs_sum, s.abs_rot_sum)
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def measure(model: str, data: str, samples: int, seqlen: int) -> dict[str, Any]:
    """Seconds per mode (plain forward, device statistics, float64 reference), interleaved."""
    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.loading import load_model

    loaded = load_model(model)
    adapter = loaded.adapter
    windows = CalibrationSpec(data, samples, seqlen, seed=0).windows(loaded.tokenizer)
    modes: dict[str, Callable[[torch.Tensor], Any]] = {
        "plain": lambda w: adapter.backbone(input_ids=w, use_cache=False),
        "device": lambda w: _device_pass(adapter, w),
        "reference": lambda w: _reference_pass(adapter, w),
    }
    seconds = dict.fromkeys(modes, 0.0)
    sums: dict[str, list[torch.Tensor]] = {}
    modes["plain"](windows[:1])  # warm-up
    for i, row in enumerate(windows):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for name in order:
            t0 = time.perf_counter()
            out = modes[name](row[None])
            seconds[name] += time.perf_counter() - t0
            if name != "plain":
                sums[name] = (
                    [a + b for a, b in zip(sums[name], out, strict=True)]
                    if name in sums
                    else list(out)
                )
    return {
        "model": model,
        "windows": samples,
        "seqlen": seqlen,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ratio_device": round(seconds["device"] / seconds["plain"], 3),
        "ratio_reference": round(seconds["reference"] / seconds["plain"], 3),
        "max_rel_diff_stats": max(
            _rel(a, b) for a, b in zip(sums["device"], sums["reference"], strict=True)
        ),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default="wikitext-2/valid.txt")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.data, args.samples, args.seqlen)))


if __name__ == "__main__":
    main()
