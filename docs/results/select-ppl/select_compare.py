"""``--select cosine`` vs ``--select ppl`` on SmolLM2-135M for n = 1..8 (patch ``rotate``).

usage: python docs/results/select-ppl/select_compare.py OUT_DIR [--stage select|eval|all]

Stage ``select`` (OUT_DIR/selection.json): calibrate as the sweep does by default (32 x 512
tokens of wikitext-2 valid.txt, seed 0); for each n the cosine plan and the ppl plan (every
candidate block, scored with the rotate patch on --holdout held-back windows), with the
selection time.

Stage ``eval`` (OUT_DIR/eval.jsonl, one line per block and window range; loss = log of the
perplexity): wikitext-2 test.txt (512-token windows), rotate patch: the ``--blocks`` given on
the first --limit windows; on the first --check-limit windows also both picks of every n and
the --check-top blocks of lowest held-back loss.
Computed with the selection's own scorer (``Calibrated.block_losses`` on the test windows:
dense states cached per block start, only the layers after the block run), which equals the
loss of the pruned-and-patched model (``tests/test_select_ppl.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lp_deploy.calibration import HOLDOUT_WINDOWS, CalibrationSpec
from lp_deploy.loading import load_model
from lp_deploy.perplexity import PerplexitySpec
from lp_deploy.pipeline import Calibrated, calibrate
from lp_deploy.selection import Gap


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _block(plan: Any) -> list[int]:
    gap = plan.gaps[0]
    return [gap.start, gap.end]


def stage_select(cal: Calibrated, prune: list[int], kind: str) -> dict[str, Any]:
    points = []
    for n in prune:
        cos = cal.plan(n, "cosine")
        cpu = time.process_time()
        ppl = cal.plan(n, "ppl", kind)
        cpu = round(time.process_time() - cpu, 1)
        points.append(
            {
                "n": n,
                "cosine": {"block": _block(cos), "similarity": cos.scores["similarity"]},
                "ppl": {"block": _block(ppl), "cpu_seconds": cpu, **ppl.scores},
            }
        )
        s = ppl.scores
        _log(f"n={n} cosine {_block(cos)} ppl {_block(ppl)} loss {s['loss']:.4f} {s['seconds']}s")
    return {"kind": kind, "holdout": cal.holdout, "points": points}


def _top(point: dict[str, Any], k: int) -> list[int]:
    losses = point["ppl"]["candidates"]
    return sorted(range(len(losses)), key=lambda i: losses[i])[:k]


def _parse_blocks(spec: str) -> list[tuple[int, int]]:
    """``"11:19,13:21"`` (end-exclusive) -> [(11, 19), (13, 21)]."""
    return [(int(a), int(b)) for a, b in (x.split(":") for x in spec.split(",") if x)]


def stage_eval(cal: Calibrated, sel: dict[str, Any], args: argparse.Namespace) -> None:
    """``--blocks`` on the first ``--limit`` windows; on the first ``--check-limit`` windows
    also the ``--check-top`` blocks of lowest held-back loss and both picks of every n."""
    kind = sel["kind"]
    blocks = _parse_blocks(args.blocks)
    checks = set(blocks)
    for p in sel["points"]:
        checks |= {tuple(p["cosine"]["block"]), tuple(p["ppl"]["block"])}
        checks |= {(i, i + p["n"]) for i in _top(p, args.check_top)}
    windows = PerplexitySpec(limit=args.limit).windows(cal.dense.tokenizer)
    ranges = [(0, args.check_limit)]
    ranges += [
        (a, min(a + args.chunk, len(windows)))
        for a in range(args.check_limit, len(windows), args.chunk)
    ]
    with (args.out / "eval.jsonl").open("a") as out:
        for lo, hi in ranges:
            gaps = [Gap(*b) for b in sorted(checks if lo == 0 else blocks)]
            t, cpu = time.perf_counter(), time.process_time()
            losses = cal.block_losses(gaps, kind, windows=windows[lo:hi])
            for gap, loss in zip(gaps, losses, strict=True):
                line = {"block": [gap.start, gap.end], "kind": kind, "windows": [lo, hi]}
                out.write(json.dumps({**line, "loss": loss}) + "\n")
            out.flush()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            _log(f"windows {lo}-{hi}: {len(gaps)} blocks in {wall:.0f}s (cpu {cpu:.0f}s)")


def _name(block: tuple[int, int]) -> str:
    """[12, 20) -> '12-19' (inclusive, as the README writes blocks)."""
    a, b = block
    return str(a) if b == a + 1 else f"{a}-{b - 1}"


def _ppl_over(
    ev: dict[tuple[int, int], dict[tuple[int, int], float]], block: tuple[int, int], hi: int
) -> float | None:
    """Perplexity of ``block`` on windows [0, hi) from the chunks that cover exactly that."""
    parts = {w: loss for w, loss in ev.get(block, {}).items() if w[1] <= hi}
    if sum(w[1] - w[0] for w in parts) != hi:
        return None
    return math.exp(sum(loss * (w[1] - w[0]) for w, loss in parts.items()) / hi)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def stage_table(sel: dict[str, Any], out: Path, args: argparse.Namespace) -> str:
    """The README table from selection.json and eval.jsonl (markdown)."""
    ev: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
    path = out / "eval.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        ev.setdefault(tuple(r["block"]), {})[tuple(r["windows"])] = r["loss"]
    rows = [
        "| n | cosine block | ppl block (its cosine rank) | held-back ppl, cosine / ppl "
        f"| test ppl {args.check_limit} windows, cosine / ppl | best checked block, "
        f"{args.check_limit} windows | test ppl {args.limit} windows, cosine / ppl "
        "| selection s, wall (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sel["points"]:
        n, s, held = p["n"], p["ppl"], p["ppl"]["candidates"]
        cos, pick = tuple(p["cosine"]["block"]), tuple(s["block"])
        checked = [b for b in ev if b[1] - b[0] == n and _ppl_over(ev, b, args.check_limit)]
        best = min(checked, key=lambda b: _ppl_over(ev, b, args.check_limit) or math.inf)
        cells = [
            str(n),
            _name(cos),
            f"{_name(pick)} ({s['cosine_rank']})",
            f"{math.exp(held[cos[0]]):.1f} / {math.exp(held[pick[0]]):.1f}",
            " / ".join(_fmt(_ppl_over(ev, b, args.check_limit)) for b in (cos, pick)),
            f"{_fmt(_ppl_over(ev, best, args.check_limit))} ({_name(best)}, of {len(checked)})",
            " / ".join(_fmt(_ppl_over(ev, b, args.limit)) for b in (cos, pick)),
            f"{s['seconds']:.0f} ({s['cpu_seconds']:.0f})",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", default="all", choices=["select", "eval", "all", "table"])
    ap.add_argument("--prune", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--kind", default="rotate")
    ap.add_argument("--holdout", type=int, default=HOLDOUT_WINDOWS)
    ap.add_argument("--limit", type=int, default=195)
    ap.add_argument("--check-limit", type=int, default=16)
    ap.add_argument("--check-top", type=int, default=2)
    ap.add_argument("--blocks", default="", help="'11:19,13:21': blocks for --limit windows")
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=CalibrationSpec.samples)
    args = ap.parse_args()
    if args.stage == "table":
        print(stage_table(json.loads((args.out / "selection.json").read_text()), args.out, args))
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dense = load_model(args.model)
    cal = calibrate(dense, CalibrationSpec(samples=args.samples), progress=False)
    cal.holdout, cal.progress = args.holdout, False
    _log(f"calibrated in {time.perf_counter() - t0:.0f}s")
    path = args.out / "selection.json"
    if args.stage in ("select", "all"):
        t = time.perf_counter()
        sel = stage_select(cal, [int(x) for x in args.prune.split(",")], args.kind)
        sel["select_total_s"] = round(time.perf_counter() - t, 1)
        path.write_text(json.dumps(sel, indent=1) + "\n")
    if args.stage in ("eval", "all"):
        stage_eval(cal, json.loads(path.read_text()), args)
    _log(f"done in {time.perf_counter() - t0:.0f}s (perplexity = exp(loss))")


if __name__ == "__main__":
    main()
