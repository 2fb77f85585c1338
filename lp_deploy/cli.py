"""Thin command line over the library entry points: ``lp-deploy STAGE ...``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lp_deploy.calibration import HOLDOUT_WINDOWS, CalibrationSpec
from lp_deploy.errors import LpDeployError
from lp_deploy.fit import PATCH_KINDS
from lp_deploy.perplexity import PerplexitySpec
from lp_deploy.selection import SELECTION_METHODS

Handler = Callable[[argparse.Namespace], int]
_CALIB = CalibrationSpec()
_PPL = PerplexitySpec()


def _add_out(p: Any, what: str) -> None:
    p.add_argument("--out", type=Path, required=True, help=what)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing directory that is not an earlier artifact of the same kind "
        "(files lp-deploy did not write are kept, never replaced)",
    )


def _add_calibration(p: Any, defaults: CalibrationSpec = _CALIB) -> None:
    """``--calib --text-field --samples --seqlen --seed``: a :class:`CalibrationSpec`."""
    p.add_argument(
        "--calib",
        default=defaults.data,
        help="calibration text: .txt, .jsonl (--text-field) or hf:NAME[:CONFIG]:SPLIT; "
        "relative names resolve in the data dir",
    )
    p.add_argument("--text-field", default=defaults.text_field)
    p.add_argument("--samples", type=int, default=defaults.samples)
    p.add_argument("--seqlen", type=int, default=defaults.seqlen)
    p.add_argument("--seed", type=int, default=defaults.seed)


def _calibration(args: argparse.Namespace) -> CalibrationSpec:
    return CalibrationSpec(args.calib, args.samples, args.seqlen, args.seed, args.text_field)


def _add_perplexity(p: Any, flag: str, default: str | None, what: str) -> None:
    """``FLAG --ppl-seqlen --ppl-limit``: a :class:`PerplexitySpec` (or none)."""
    p.add_argument(flag, dest="ppl", default=default, help=what)
    p.add_argument("--ppl-seqlen", type=int, default=_PPL.seqlen)
    p.add_argument("--ppl-limit", type=int, default=None, help="evaluate only the first N windows")


def _perplexity(args: argparse.Namespace) -> PerplexitySpec | None:
    if args.ppl is None or args.ppl.lower() == "none":
        return None
    return PerplexitySpec(args.ppl, args.ppl_seqlen, args.ppl_limit)


def _add_ppl_selection(p: Any) -> None:
    """``--candidates K --holdout H`` of ``--select ppl``."""
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="--select ppl: score only the K blocks of highest cosine similarity (default: all)",
    )
    p.add_argument(
        "--holdout",
        type=int,
        default=HOLDOUT_WINDOWS,
        help="--select ppl: calibration windows held back for scoring (no token shared with "
        f"the fitting windows; default {HOLDOUT_WINDOWS})",
    )


def _add_memory(p: Any, offload: bool) -> None:
    """``--device-map`` (and ``--offload/--no-offload``): where the weights live."""
    if offload:
        p.add_argument(
            "--offload",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="stream the decoder layers from the safetensors files, one resident at a "
            "time, and read only the kept layers afterwards (default: only when the weights "
            "do not fit in the memory available; the log says which path was taken)",
        )
    p.add_argument(
        "--device-map",
        default=None,
        help="handed to transformers/accelerate, e.g. 'auto' to spread the model over "
        "several GPUs (untested here: no GPU)",
    )


def _add_patch(sub: Any) -> None:
    p = sub.add_parser("patch", help="prune N layers and fit a LinearPatch")
    p.add_argument("model", help="alias (smollm2-135m), model directory, .gguf file or hub id")
    p.add_argument("--prune", type=int, default=None, help="number of layers to delete")
    methods = "; ".join(f"{m.name}: {m.description}" for m in SELECTION_METHODS.values())
    p.add_argument(
        "--select",
        default="cosine",
        help=f"{methods}; or a layer list '3,4,7' / '10-14' (inclusive) / '10:15'",
    )
    kinds = "; ".join(f"{k.name}: {k.description}" for k in PATCH_KINDS.values())
    p.add_argument("--patch", default="rotate", choices=list(PATCH_KINDS), help=kinds)
    p.add_argument(
        "--ridge",
        type=float,
        default=0.0,
        help="least-squares kinds: ridge term, relative to the mean input energy (0: none)",
    )
    _add_calibration(p)
    _add_ppl_selection(p)
    p.add_argument("--batch-size", type=int, default=1)
    _add_memory(p, offload=True)
    _add_out(p, "output checkpoint directory")
    _add_perplexity(p, "--eval-ppl", None, "text file for perplexity (dense/pruned/patched)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=_run_patch)


def _run_patch(args: argparse.Namespace) -> int:
    from lp_deploy.pipeline import PatchConfig, run_patch

    cfg = PatchConfig(
        model=args.model,
        prune=args.prune,
        select=args.select,
        patch=args.patch,
        calibration=_calibration(args),
        perplexity=_perplexity(args),
        out=args.out,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
        ridge=args.ridge,
        candidates=args.candidates,
        holdout=args.holdout,
        offload=args.offload,
        device_map=args.device_map,
    )
    result = run_patch(cfg)
    _print_patch_summary(result.summary, args.out)
    return 0


def _print_patch_summary(s: dict[str, Any], out: Path) -> None:
    print(
        f"\nlayers: {s['layers_before']} -> {s['layers_after']}  "
        f"removed {s['removed']} ({s['selection']})"
    )
    if "similarity" in s["scores"]:
        print(f"cosine similarity across the gap: {s['scores']['similarity']:.4f}")
    if "loss" in s["scores"]:
        sc = s["scores"]
        print(
            f"held-back loss {sc['loss']:.4f} (perplexity {sc['ppl']:.2f}), best of "
            f"{sc['scored']} blocks scored in {sc['seconds']} s"
        )
    for name, value in s["perplexity"].items():
        print(f"perplexity {name:>7}: {value:.3f}")
    print(f"wrote {out} (summary.json inside) in {s['seconds']} s")


def _add_fold(sub: Any) -> None:
    from lp_deploy.fold import VERIFY_SAMPLES, VERIFY_SEQLEN

    p = sub.add_parser("fold", help="fold the patch into the weights (rotate the residual stream)")
    p.add_argument(
        "patched",
        type=Path,
        help="checkpoint written by 'lp-deploy patch', or a dense model (alias, model dir, "
        ".gguf): its residual stream is rotated",
    )
    _add_out(p, "output checkpoint directory")
    p.add_argument(
        "--no-rotate",
        action="store_true",
        help="keep the patch as one explicit MatMul (no untied embeddings)",
    )
    p.add_argument(
        "--calib",
        default=None,
        help="verification text (default: the checkpoint's calibration data and text field)",
    )
    p.add_argument("--text-field", default=None, help="default: the checkpoint's")
    p.add_argument("--verify-samples", type=int, default=VERIFY_SAMPLES)
    p.add_argument("--verify-seqlen", type=int, default=VERIFY_SEQLEN)
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max |logit diff| / max |logit| allowed against the unfolded model",
    )
    p.add_argument(
        "--online-hadamard",
        action="store_true",
        help="also rotate every down_proj input: x H at run time (an explicit op in the graph), "
        "H folded into the weight; spreads activation outliers before quantization",
    )
    p.set_defaults(handler=_run_fold)


def _verify_spec(args: argparse.Namespace) -> CalibrationSpec:
    """The checkpoint's verification windows with the command line's overrides."""
    from lp_deploy.checkpoint import read_meta
    from lp_deploy.errors import CheckpointError
    from lp_deploy.fold import default_verify_spec

    try:
        meta = read_meta(args.patched)
    except CheckpointError:  # a dense model: the default calibration text
        meta = {}
    spec = default_verify_spec(meta)
    overrides = {"data": args.calib, "text_field": args.text_field}
    return dataclasses.replace(
        spec,
        **{k: v for k, v in overrides.items() if v is not None},
        samples=args.verify_samples,
        seqlen=args.verify_seqlen,
    )


def _run_fold(args: argparse.Namespace) -> int:
    from lp_deploy.fold import FoldConfig, run_fold

    cfg = FoldConfig(
        patched=args.patched,
        out=args.out,
        overwrite=args.overwrite,
        rotate=not args.no_rotate,
        verify=_verify_spec(args),
        tolerance=args.tolerance,
        progress=not args.quiet,
        online_hadamard=args.online_hadamard,
    )
    report = run_fold(cfg).report
    print(f"\nfold: {report.mode}" + (f" ({report.reason})" if report.reason else ""))
    print(f"patch operations left: {report.patch_ops}")
    if report.online_hadamard:
        print("online Hadamard: every down_proj reads x H (H folded into its weight)")
    delta = report.params_after - report.params_before
    print(
        f"parameters: {report.params_before:,} -> {report.params_after:,} ({delta:+,}"
        + (", embeddings untied" if report.untied_embeddings else "")
        + ")"
    )
    print(
        f"verified: max |logit diff| {report.max_abs_diff:.2e} "
        f"({report.max_rel_diff:.2e} relative, tolerance {cfg.tolerance:.0e})"
    )
    print(f"wrote {args.out}")
    return 0


def _add_distill(sub: Any) -> None:
    from lp_deploy.distill import PREFIX_DTYPES, DistillConfig
    from lp_deploy.trainable import TRAIN_MODES

    d = DistillConfig(Path("."))
    p = sub.add_parser("distill", help="refine the patch by offline knowledge distillation")
    p.add_argument(
        "patched",
        type=Path,
        help="checkpoint written by 'lp-deploy patch' (--patch lstsq is the best start for "
        "--train full; diag needs --patch rotate)",
    )
    p.add_argument("--data", default=d.data.data, help="distillation text (like --calib)")
    p.add_argument("--text-field", default=d.data.text_field)
    p.add_argument("--samples", type=int, default=d.data.samples, help="windows (10%% validate)")
    p.add_argument("--seqlen", type=int, default=d.data.seqlen)
    p.add_argument("--seed", type=int, default=d.data.seed)
    p.add_argument("--topk", type=int, default=d.topk, help="teacher probabilities kept per token")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="peak; cosine down to lr/20")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--train",
        default=d.train,
        choices=TRAIN_MODES,
        help="full: the whole d x d matrix; diag: only s of P = H diag(s) H^T (stays per-channel "
        "after fold)",
    )
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs")
    p.add_argument(
        "--teacher-cache", type=Path, default=None, help="default: keyed under ~/.cache/lp_deploy"
    )
    p.add_argument("--prefix-dtype", default=d.prefix_dtype, choices=list(PREFIX_DTYPES))
    p.add_argument("--save-every", type=int, default=0, help="also save the state every N steps")
    p.add_argument("--resume", action="store_true", help="continue a killed run with --out")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:0 ...")
    _add_out(p, "output checkpoint directory")
    _add_perplexity(p, "--eval-ppl", None, "text file for the distilled model's perplexity")
    p.set_defaults(handler=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from lp_deploy.distill import DistillConfig, run_distill

    cfg = DistillConfig(
        patched=args.patched,
        data=CalibrationSpec(args.data, args.samples, args.seqlen, args.seed, args.text_field),
        out=args.out,
        overwrite=args.overwrite,
        topk=args.topk,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        train=args.train,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        patience=args.patience,
        teacher_cache=args.teacher_cache,
        prefix_dtype=args.prefix_dtype,
        save_every=args.save_every,
        resume=args.resume,
        device=args.device,
        perplexity=_perplexity(args),
        progress=not args.quiet,
    )
    s = run_distill(cfg).summary
    val = ", ".join("n/a" if v is None else f"{v:.4f}" for v in s["val_loss"])
    print(f"\n{s['train']}: {s['steps']} steps, val loss {val} (best epoch {s['best_epoch']})")
    if "perplexity" in s:
        print(f"perplexity distilled: {s['perplexity']:.3f}")
    times = ", ".join(f"{k} {v['wall_s']} s" for k, v in s["phases"].items())
    print(f"{times}; peak RSS {s['peak_rss_mb']} MB")
    print(f"wrote {args.out} (distill.json inside)")
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export to ONNX (with KV cache) or a TensorRT engine")
    fmt = p.add_subparsers(dest="format", required=True)
    o = fmt.add_parser("onnx", help="ONNX graph with KV cache, validated in ONNX Runtime")
    o.add_argument("model", help="patched checkpoint dir, or alias / model dir / .gguf / hub id")
    _add_out(o, "output directory")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    o.add_argument(
        "--optimize",
        type=int,
        nargs="?",
        const=1,
        default=0,
        choices=[0, 1, 2],
        help="1: ONNX Runtime fusions; 2: also ORT's offline graph optimisation",
    )
    o.add_argument("--opset", type=int, default=20)
    o.add_argument("--no-validate", action="store_true", help="skip the check against PyTorch")
    o.add_argument("--text", default=None, help="validation text (default: wikitext-2 test)")
    o.add_argument("--decode-steps", type=int, default=8)
    _add_quantize(o)
    o.set_defaults(handler=_run_export_onnx)
    t = fmt.add_parser("tensorrt", help="TensorRT engine from an ONNX export (needs TensorRT)")
    t.add_argument("onnx_dir", type=Path, help="directory written by 'lp-deploy export onnx'")
    t.add_argument("--out", type=Path, default=None, help="engine file (default: DIR/model.plan)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing engine file")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--max-batch", type=int, default=4)
    t.add_argument("--max-seq", type=int, default=512)
    t.add_argument("--max-past", type=int, default=1024)
    t.set_defaults(handler=_run_export_tensorrt)


def _add_quantize(o: Any) -> None:
    """``--quantize`` and its options (validated by ``QuantizeConfig.check``, so that a bad
    value gets the library's message)."""
    o.add_argument(
        "--quantize",
        default=None,
        metavar="int8|int4",
        help="int8: block-wise int8 weights (MatMulNBits; --int8-method dynamic: "
        "quantize_dynamic); int4: block-wise 4-bit weights (MatMulNBits)",
    )
    o.add_argument(
        "--int8-method",
        default="block",
        metavar="block|dynamic",
        help="int8: block (MatMulNBits, 8 bits; default) or dynamic (int8 weights with one "
        "scale per tensor and int8 activations: MatMulInteger)",
    )
    o.add_argument(
        "--block-size", type=int, default=32, help="block-wise: 32, 64 or 128 weights per scale"
    )
    o.add_argument(
        "--accuracy-level",
        type=int,
        default=None,
        help="block-wise: 0 fp32 or 4 int8 activations (default: 4 for int8, 0 for int4)",
    )
    o.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="MODULE",
        help="keep this weight in fp32 (module name or glob: lm_head, down_proj, layers.3.*); "
        "repeatable",
    )
    o.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        help="validation limit, relative (default 0.05 int8, 0.10 int4)",
    )
    o.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="validation limit: greedy-token agreement with fp32 (default 0.80)",
    )
    o.add_argument(
        "--auto-exclude",
        type=int,
        default=0,
        metavar="N",
        help="keep the N most sensitive groups (--scan-by: one layer's projections or one "
        "projection kind; lm_head) out (--fallback), chosen by a scan: the perplexity increase "
        "when only that group is quantized",
    )
    o.add_argument(
        "--scan-by",
        default="layer",
        metavar="layer|kind",
        help="--auto-exclude's group: one layer's projections, or one projection kind across "
        "the layers (q_proj, down_proj, ...)",
    )
    o.add_argument(
        "--fallback",
        default="fp32",
        metavar="fp32|int8",
        help="int4: precision of the weights kept out of int4 (--exclude, --auto-exclude): "
        "fp32, or block-wise int8",
    )
    o.add_argument("--quant-windows", type=int, default=8, help="validation windows")
    o.add_argument("--quant-seqlen", type=int, default=512, help="tokens per validation window")


def _quantize_config(args: argparse.Namespace) -> Any:
    from lp_deploy.exporters.quantize import QuantizeConfig

    if args.quantize is None:
        return None
    return QuantizeConfig(
        mode=args.quantize,
        int8_method=args.int8_method,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
        exclude=tuple(args.exclude),
        max_ppl_increase=args.max_ppl_increase,
        min_agreement=args.min_agreement,
        text=args.text,
        windows=args.quant_windows,
        seqlen=args.quant_seqlen,
        auto_exclude=args.auto_exclude,
        scan_by=args.scan_by,
        fallback=args.fallback,
    )


def _modules(names: list[str], most: int = 6) -> str:
    """A list of module names, or past ``most`` their count and kinds (``down_proj``)."""
    from lp_deploy.exporters.quantize import weight_group

    if len(names) <= most:
        return ", ".join(names) or "none"
    kinds = sorted({weight_group(n, "kind") for n in names})
    return f"{len(names)} weights ({', '.join(kinds)})"


def _print_quantization(q: dict[str, Any]) -> None:
    what = f"{q['mode']} dynamic"
    if q["block_size"]:
        what = f"{q['mode']} block-wise (block {q['block_size']}, accuracy level "
        what += f"{q['accuracy_level']})"
    if q.get("sensitivity"):
        scan = ", ".join(f"{g} {100 * v:+.1f}%" for g, v in list(q["sensitivity"].items())[:5])
        print(f"sensitivity (perplexity increase, one group quantized): {scan} ...")
    excluded = _modules(q["excluded"])
    kept = f"kept in {q.get('fallback') or 'fp32'}"
    print(f"quantized {q['quantized']} MatMuls to {what}; {kept}: {excluded}")
    v = q["validation"]
    if v:
        print(
            f"vs fp32 on {v['windows']} x {v['seqlen']} tokens: perplexity "
            f"{v['fp32_perplexity']:.3f} -> {v['perplexity']:.3f} "
            f"({100 * v['perplexity_increase']:+.1f}%, limit "
            f"{100 * v['max_perplexity_increase']:+.1f}%), greedy-token agreement "
            f"{100 * v['token_agreement']:.1f}% (limit {100 * v['min_token_agreement']:.0f}%)"
        )


def _run_export_onnx(args: argparse.Namespace) -> int:
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx, read_report

    cfg = OnnxExportConfig(
        model=args.model,
        out=args.out,
        overwrite=args.overwrite,
        dtype=args.dtype,
        optimize=args.optimize,
        opset=args.opset,
        validate=not args.no_validate,
        text=args.text,
        decode_steps=args.decode_steps,
        quantize=_quantize_config(args),
    )
    out = export_onnx(cfg).out
    r = read_report(out)
    print(
        f"\nexported {r['num_layers']} layers ({r['dtype']}, opset {r['opset']}) "
        f"in {r['seconds']['total']} s, {r['onnx_bytes'] / 1e6:.1f} MB"
    )
    if r["fusions"]:
        print("fusions: " + ", ".join(f"{k} x{v}" for k, v in r["fusions"].items()))
    v = r["validation"]
    if v:
        print(
            f"validated on {v['prefill_tokens']}+{v['decode_steps']} tokens: max |logit diff| "
            f"prefill {v['prefill_logits']:.2e}, decode {v['decode_logits']:.2e}, padded "
            f"{v['padded_batch_logits']:.2e} (tolerance {v['tolerance']:.1e})"
        )
    if r.get("quantization"):
        _print_quantization(r["quantization"])
    print(f"wrote {out}")
    return 0


def _run_export_tensorrt(args: argparse.Namespace) -> int:
    from lp_deploy.exporters.tensorrt import TensorRTConfig, build_engine

    cfg = TensorRTConfig(
        onnx_dir=args.onnx_dir,
        out=args.out,
        overwrite=args.overwrite,
        fp16=args.fp16,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        max_past=args.max_past,
    )
    print(f"wrote {build_engine(cfg)}")
    return 0


def _runtime_names() -> list[str]:
    from lp_deploy.runtimes import RUNTIMES

    return [name for spec in RUNTIMES.values() for name in (spec.name, *spec.aliases)]


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with a runtime")
    p.add_argument("artifact", help="ONNX export dir (onnxruntime) or checkpoint/model (torch)")
    p.add_argument("prompt")
    p.add_argument("--runtime", default="torch", help=", ".join(_runtime_names()))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from lp_deploy.runtimes import create_runtime
    from lp_deploy.runtimes.base import TextDeltas

    opts: dict[str, Any] = {"threads": args.threads}
    if args.dtype:
        opts["dtype"] = args.dtype
    rt = create_runtime(args.runtime, args.artifact, **opts)
    tokens = rt.stream(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    text = TextDeltas(rt.decode)
    for token in tokens:
        print(text.push(token), end="", flush=True)
    print(text.finish(), flush=True)
    return 0


def _int_list(spec: str) -> list[int]:
    """``'128,512'`` -> [128, 512] (an argparse type)."""
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {spec!r}"
        ) from None


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="accuracy, latency and memory: baseline vs candidates")
    p.add_argument("--baseline", default=None, help="default: the candidate's source model")
    p.add_argument("--candidate", action="append", required=True, help="repeatable")
    p.add_argument(
        "--runtime",
        action="append",
        default=None,
        help=f"{', '.join(_runtime_names())}; default torch; repeatable",
    )
    p.add_argument("--tasks", default=None, help="QA tasks 'piqa,arc_easy,...' or 'all'")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task")
    _add_perplexity(p, "--ppl", None, "perplexity text file")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--memory", action="store_true", help="peak RSS in a fresh process per case")
    p.add_argument("--prompt-lengths", type=_int_list, default=[128, 512, 2048])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=_int_list, default=[1])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="QA scoring batch size")
    p.add_argument(
        "--qa-workers",
        type=int,
        default=1,
        help="QA scoring processes, each its own runtime with --threads threads (default 1); "
        "2 on a 2-core CPU: ~2x",
    )
    p.add_argument("--data-dir", type=Path, default=None, help="QA data (default: shared data)")
    _add_out(p, "report directory")
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import shlex

    from lp_deploy.benchmarks.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        candidates=args.candidate,
        out=args.out,
        baseline=args.baseline,
        runtimes=args.runtime or ["torch"],
        tasks=args.tasks.split(",") if args.tasks else [],
        limit=args.limit,
        perplexity=_perplexity(args),
        latency=args.latency,
        memory=args.memory,
        prompt_lengths=args.prompt_lengths,
        decode_tokens=args.decode_tokens,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        eval_batch_size=args.eval_batch_size,
        qa_workers=args.qa_workers,
        data_dir=args.data_dir,
        progress=not args.quiet,
        command=shlex.join(["lp-deploy", *sys.argv[1:]]),
        overwrite=args.overwrite,
    )
    result = run_bench(cfg)
    print((result.out / "report.md").read_text())
    for name, block in result.data["runtimes"].items():
        if block["status"] != "ok":
            print(f"warning: runtime {name} skipped: {block['reason']}", file=sys.stderr)
    print(f"wrote {result.out}/report.json, report.md, {', '.join(result.plots)}")
    return 0


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="quality against the number of pruned layers")
    p.add_argument("model", help="alias (smollm2-135m), model directory, .gguf file or hub id")
    p.add_argument("--prune", default="1..8", help="'1..8', '1-8' or '2,4,6'")
    from lp_deploy.benchmarks.sweep import sweep_kinds

    p.add_argument(
        "--patches",
        default="none,rotate",
        help=f"comma list of {', '.join(sweep_kinds())}",
    )
    p.add_argument(
        "--select",
        default="cosine",
        help=f"comma list of {', '.join(SELECTION_METHODS)}: every point for each (ppl scores "
        "blocks with each --patches kind)",
    )
    _add_calibration(p)
    _add_ppl_selection(p)
    _add_perplexity(p, "--ppl", _PPL.data, "perplexity text file, or 'none'")
    p.add_argument("--tasks", default=None, help="QA tasks per point ('copa,arc_easy' or 'all')")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task")
    p.add_argument("--data-dir", type=Path, default=None, help="QA data (default: shared data)")
    p.add_argument(
        "--latency",
        action="store_true",
        help="also time prompt + greedy decode of each point against dense (interleaved); "
        "with --ppl or --tasks, draws the quality/speed front (front.png)",
    )
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=3,
        help="--latency: interleaved rounds per point (more: a steadier speed-up)",
    )
    _add_out(p, "writes sweep.json, sweep.png (and front.png with --latency)")
    p.set_defaults(handler=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from lp_deploy.benchmarks.bench import parse_tasks, qa_evaluator
    from lp_deploy.benchmarks.sweep import SweepConfig, check_kinds, parse_range, run_sweep

    patches = [p.strip() for p in args.patches.split(",") if p.strip()]
    check_kinds(patches)
    prune = parse_range(args.prune)
    if not prune or min(prune) < 1:
        raise ValueError(f"--prune needs positive layer counts, got {args.prune!r}")
    tasks = parse_tasks(args.tasks)
    cfg = SweepConfig(
        model=args.model,
        prune=prune,
        select=args.select,
        patches=patches,
        calibration=_calibration(args),
        perplexity=_perplexity(args),
        out=args.out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        latency=args.latency,
        latency_repeats=args.latency_repeats,
        candidates=args.candidates,
        holdout=args.holdout,
    )
    extra = qa_evaluator(tasks, args.data_dir, args.limit, progress=not args.quiet)
    result = run_sweep(cfg, extra if tasks else None)
    _print_sweep(result.data)
    print(f"wrote {args.out} (sweep.json, plots) in {result.data['seconds']} s")
    return 0


def _print_sweep(result: dict[str, Any]) -> None:
    from lp_deploy.benchmarks.sweep import STDERR

    names = {m for p in result["points"] for m in p["metrics"] if not m.endswith(STDERR)}
    cols = [(m, max(10, len(m))) for m in sorted(names)]

    def row(head: list[str], values: dict[str, float | None]) -> str:
        cells = [values.get(m) for m, _ in cols]
        nums = [float("nan") if v is None else v for v in cells]
        return "  ".join([*head, *[f"{v:{w}.4f}" for v, (_, w) in zip(nums, cols, strict=True)]])

    print("\n" + "  ".join(["pruned", "select", "patch   ", *[f"{m:>{w}}" for m, w in cols]]))
    print(row(["     0", "      ", "dense   "], result["baseline"]["metrics"]))
    for p in result["points"]:
        print(row([f"{p['prune']:6d}", f"{p['select']:<6}", f"{p['patch']:<8}"], p["metrics"]))


def _add_triton(sub: Any) -> None:
    p = sub.add_parser("triton", help="Triton Inference Server: model repository, server, client")
    cmd = p.add_subparsers(dest="triton_command", required=True)
    b = cmd.add_parser("build", help="a Triton model repository from an ONNX export")
    b.add_argument("export_dir", type=Path, help="directory written by 'lp-deploy export onnx'")
    b.add_argument(
        "--repo", "--out", dest="repo", type=Path, required=True, help="model repository"
    )
    b.add_argument("--name", default=None, help="model name (default: the export's folder)")
    b.add_argument("--instances", type=int, default=1, help="model instances")
    b.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    b.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    b.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    b.add_argument("--max-tokens", type=int, default=32, help="default max_tokens")
    b.add_argument("--engine", type=Path, default=None, help="TensorRT engine (tensorrt_plan)")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a repository lp-deploy did not write (its models are kept)",
    )
    b.set_defaults(handler=_run_triton_build)
    s = cmd.add_parser("serve", help="run the bundled tritonserver on 127.0.0.1 until Ctrl-C")
    s.add_argument("repo", type=Path)
    s.add_argument("--http-port", type=int, default=8000, help="0: a free port")
    s.add_argument("--grpc-port", type=int, default=8001, help="0: a free port")
    s.add_argument("--model", action="append", default=None, help="default: python models")
    s.set_defaults(handler=_run_triton_serve)
    g = cmd.add_parser("generate", help="generate text with a served model")
    g.add_argument("url", help="HTTP host:port (gRPC host:port with --grpc)")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="HTTP generate_stream")
    g.add_argument("--grpc", action="store_true", help="gRPC streaming (stream_infer)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(handler=_run_triton_generate)
    _add_triton_bench(cmd)


def _add_triton_bench(cmd: Any) -> None:
    from lp_deploy.serving.client import PROTOCOLS

    p = cmd.add_parser("bench", help="load benchmark: N concurrent clients vs 1, side by side")
    p.add_argument("source", type=Path, nargs="?", help="ONNX export or model repository")
    p.add_argument("--url", default=None, help="a running server's HTTP host:port instead")
    p.add_argument("--grpc-url", default=None)
    p.add_argument("--model", default="bench", help="model name (in the repository/server)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--protocol", default="http-stream", choices=list(PROTOCOLS))
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per instance")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.set_defaults(handler=_run_triton_bench)


def _run_triton_bench(args: argparse.Namespace) -> int:
    from lp_deploy.benchmarks.serving import ServingBenchConfig, format_result, run_serving_bench

    cfg = ServingBenchConfig(
        source=args.source,
        model=args.model,
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        protocol=args.protocol,
        max_batch=args.max_batch,
        threads=args.threads,
        url=args.url,
        grpc_url=args.grpc_url,
        out=args.json,
    )
    result = run_serving_bench(cfg)
    print(format_result(result))
    bad = result.concurrent.errors + result.concurrent.mismatches + result.single.errors
    return 1 if bad else 0


def _run_triton_build(args: argparse.Namespace) -> int:
    from lp_deploy.serving.triton_repo import TritonRepoConfig, build_repo

    cfg = TritonRepoConfig(
        export_dir=args.export_dir,
        repo=args.repo,
        name=args.name,
        instances=args.instances,
        device=args.device,
        max_batch=args.max_batch,
        threads=args.threads,
        max_tokens=args.max_tokens,
        engine=args.engine,
        overwrite=args.overwrite,
    )
    result = build_repo(cfg)
    print(f"wrote {result.repo}: models {', '.join(result.models)} (see README.md there)")
    return 0


def _run_triton_serve(args: argparse.Namespace) -> int:
    from lp_deploy.serving.server import ServerConfig, serve

    serve(ServerConfig(args.repo, args.http_port, args.grpc_port, args.model))
    return 0


def _run_triton_generate(args: argparse.Namespace) -> int:
    from lp_deploy.serving import client

    params = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    params["seed"] = args.seed
    if args.grpc or args.stream:
        if args.grpc:
            pieces = client.grpc_stream(
                args.url, args.model, args.prompt, args.max_tokens, **params
            )
        else:
            pieces = client.http_generate_stream(
                args.url, args.model, args.prompt, args.max_tokens, **params
            )
        for text, _ in pieces:
            print(text, end="", flush=True)
        print(flush=True)
    else:
        out = client.http_generate(args.url, args.model, args.prompt, args.max_tokens, **params)
        print(out.text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lp-deploy`` argument parser."""
    parser = argparse.ArgumentParser(prog="lp-deploy", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    for command in sub.choices.values():  # -q / -v also after the command ('patch ... -q')
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return parser


_COMMANDS: list[Callable[[Any], None]] = [_add_patch, _add_distill, _add_fold]
_COMMANDS += [_add_export, _add_generate]
_COMMANDS += [_add_triton]
_COMMANDS += [_add_bench, _add_sweep]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lp-deploy`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet:  # also transformers' own bars ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        handler: Handler = args.handler
        return handler(args)
    except (LpDeployError, FileNotFoundError, ValueError) as exc:
        print(f"lp-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
