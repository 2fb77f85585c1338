"""Test perplexity of every contiguous block of n = 1..8 layers of SmolLM2-135M (patch ``rotate``),
to check the picks of selection.json against the best block of each size.

usage: python docs/results/select-ppl/all_blocks.py OUT_DIR [--limit 8] [--prune 8,7,...,1]
       python docs/results/select-ppl/all_blocks.py OUT_DIR --stage table

Calibration as select_compare.py (the sweep's default: 32 x 512 tokens of wikitext-2 valid.txt,
seed 0); the rotate patch of each block fitted on it; loss on the first --limit 512-token windows
of wikitext-2 test.txt with the selection's own scorer (``Calibrated.block_losses``: dense states
cached per block start, only the layers after the block run; equal to the pruned model's loss,
tests/test_select_ppl.py). One line per block in OUT_DIR/all_blocks.jsonl. The table compares,
per n, the best block with the ppl pick and the cosine pick of selection.json (beside this file).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lp_deploy.calibration import CalibrationSpec
from lp_deploy.loading import load_model
from lp_deploy.perplexity import PerplexitySpec
from lp_deploy.pipeline import calibrate
from lp_deploy.selection import Gap

HERE = Path(__file__).parent  # selection.json, the picks being checked


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _name(a: int, b: int) -> str:
    return str(a) if b == a + 1 else f"{a}-{b - 1}"


def stage_eval(out: Path, limit: int, prune: list[int]) -> None:
    torch.set_num_threads(1)
    dense = load_model("smollm2-135m")
    cal = calibrate(dense, CalibrationSpec(), progress=False)
    cal.progress = False
    windows = PerplexitySpec(limit=limit).windows(dense.tokenizer)
    path = out / "all_blocks.jsonl"
    done = (
        {tuple(json.loads(x)["block"]) for x in path.read_text().splitlines()}
        if path.exists()
        else set()
    )
    with path.open("a") as f:
        for n in prune:
            gaps = [Gap(s, s + n) for s in range(cal.num_layers - n + 1) if (s, s + n) not in done]
            t, cpu = time.perf_counter(), time.process_time()
            losses = cal.block_losses(gaps, "rotate", windows=windows) if gaps else []
            for g, loss in zip(gaps, losses, strict=True):
                f.write(
                    json.dumps({"block": [g.start, g.end], "windows": [0, limit], "loss": loss})
                    + "\n"
                )
            f.flush()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            _log(f"n={n}: {len(gaps)} blocks in {wall:.0f}s (cpu {cpu:.0f}s)")


def stage_table(out: Path) -> str:
    ppl = {  # OUT_DIR/all_blocks.jsonl; this directory's copy holds the 2026-12-02 run
        tuple(r["block"]): math.exp(r["loss"])
        for r in map(json.loads, (out / "all_blocks.jsonl").read_text().splitlines())
    }
    sel = json.loads((HERE / "selection.json").read_text())
    rows = [
        "| n | blocks | best block (ppl) | ppl pick (ppl, x best) | cosine pick (ppl, x best) "
        "| 2nd best (ppl) |",
        "|---|---|---|---|---|---|",
    ]
    for p in sel["points"]:
        n = p["n"]
        blocks = sorted((b for b in ppl if b[1] - b[0] == n), key=lambda b: ppl[b])
        if not blocks:
            continue
        best = blocks[0]
        cells = [str(n), str(len(blocks)), f"{_name(*best)} ({ppl[best]:.2f})"]
        for key in ("ppl", "cosine"):
            b = tuple(p[key]["block"])
            cells.append(f"{_name(*b)} ({ppl[b]:.2f}, {ppl[b] / ppl[best]:.3f}x)")
        cells.append(f"{_name(*blocks[1])} ({ppl[blocks[1]]:.2f})")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--stage", default="eval", choices=["eval", "table"])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--prune", default="8,7,6,5,4,3,2,1")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "eval":
        stage_eval(args.out, args.limit, [int(x) for x in args.prune.split(",")])
    print(stage_table(args.out))


if __name__ == "__main__":
    main()
