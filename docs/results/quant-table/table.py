"""The README's quantization table from the two bench reports of ``table.sh`` (latency + memory,
perplexity) and each export's ``export.json`` (validation against its fp32 graph).

    python docs/results/quant-table/table.py LATENCY_REPORT_DIR PPL_REPORT_DIR [PPL_REPORT_DIR ...]

With several perplexity reports, a model's figure comes from the last report that has it (the
session-5 table: session 4's report for the graphs that did not change, bit-identical but for
their value_info, and session 5's for the re-quantized ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODELS = {
    "dense": "dense",
    "dense-rot": "dense, rotated + online Hadamard",
    "p5-norot": "5/30 `rotate`, unfolded (`--no-rotate`)",
    "p5-fold": "5/30 folded, rotated + online Hadamard",
}
PRECISION = {
    "fp32": "fp32",
    "int8": "int8 (block 32, level 4)",
    "int4": "int4 (block 32, level 0)",
}


def onnxruntime(report: Path) -> dict[str, Any]:
    """The ONNX Runtime section of a bench report (``models``, ``latency``)."""
    data = json.loads((report / "report.json").read_text())
    return data["runtimes"]["onnxruntime"]


def ratio(entry: dict[str, Any]) -> str:
    lo, hi = entry["ratio_ci95"]
    return f"{entry['ratio']:.3f} ({lo:.3f}-{hi:.3f})"


def row(name: str, lat: dict[str, Any], mem: dict[str, Any], ppl: dict[str, Any]) -> str:
    model, precision = name.rsplit("-", 1)
    own = ppl[f"{model}-fp32"]["perplexity"]
    p = ppl[name]["perplexity"]
    meta = json.loads((Path(mem[name]["artifact"]) / "export.json").read_text())
    v = (meta.get("quantization") or {}).get("validation")
    check = (
        f"{100 * v['perplexity_increase']:+.1f}%, {100 * v['token_agreement']:.1f}%" if v else "–"
    )
    own_decode = lat["decode"][f"{model}-fp32"]["median_ms_per_token"]
    decode = lat["decode"][name]
    cells = [
        MODELS[model],
        PRECISION[precision],
        f"{p:.2f}",
        "–" if precision == "fp32" else f"{100 * (p / own - 1):+.1f}%",
        check,
        f"{mem[name]['disk_bytes'] / 2**20:.0f} MiB",
        f"{mem[name]['memory']['peak_rss_mb']:.0f} MiB",
        ratio(lat["prefill"][name]),
        f"{decode['median_ms_per_token']:.1f}",
        ratio(decode),
        f"{own_decode / decode['median_ms_per_token']:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    lat_dir, *ppl_dirs = map(Path, sys.argv[1:])
    timed = onnxruntime(lat_dir)
    lat, mem = timed["latency"][0], timed["models"]
    ppl: dict[str, Any] = {}
    for ppl_dir in ppl_dirs:
        ppl.update(onnxruntime(ppl_dir)["models"])
    print(
        "| model | weights | perplexity (195 windows) | vs its fp32 | export check: "
        "perplexity, greedy agreement (8 windows) | on disk | peak RSS | prefill(128) ratio "
        "vs dense fp32 | decode ms/token | decode ratio vs dense fp32 | decode speed-up vs "
        "its fp32 |"
    )
    print("|" + "---|" * 11)
    for model in MODELS:
        for precision in PRECISION:
            print(row(f"{model}-{precision}", lat, mem, ppl))


if __name__ == "__main__":
    main()
