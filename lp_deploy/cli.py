"""Thin command line over the library entry points: ``lp-deploy STAGE ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lp_deploy.errors import LpDeployError

Handler = Callable[[argparse.Namespace], int]


def _add_patch(sub: Any) -> None:
    p = sub.add_parser("patch", help="prune N layers and fit a LinearPatch")
    p.add_argument("model", help="alias (smollm2-135m), model directory, .gguf file or hub id")
    p.add_argument("--prune", type=int, default=None, help="number of layers to delete")
    p.add_argument(
        "--select",
        default="cosine",
        help="cosine (contiguous block), bi (ShortGPT), or layers '3,4,7' / '10-14'",
    )
    p.add_argument("--patch", default="rotate", choices=["rotate", "diag", "none"])
    p.add_argument(
        "--calib",
        default="wikitext-2/valid.txt",
        help="calibration text: .txt, .jsonl (--text-field) or hf:NAME[:CONFIG]:SPLIT; "
        "relative names resolve in the data dir",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument(
        "--eval-ppl", default=None, help="text file for perplexity (dense/pruned/patched)"
    )
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--ppl-limit", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=_run_patch)


def _run_patch(args: argparse.Namespace) -> int:
    from lp_deploy.pipeline import PatchConfig, run_patch

    cfg = PatchConfig(
        model=args.model,
        prune=args.prune,
        select=args.select,
        patch=args.patch,
        calib=args.calib,
        samples=args.samples,
        seqlen=args.seqlen,
        seed=args.seed,
        out=args.out,
        eval_ppl=args.eval_ppl,
        ppl_seqlen=args.ppl_seqlen,
        ppl_limit=args.ppl_limit,
        batch_size=args.batch_size,
        text_field=args.text_field,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
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
    for name, value in s["perplexity"].items():
        print(f"perplexity {name:>7}: {value:.3f}")
    print(f"wrote {out} (summary.json inside) in {s['seconds']} s")


def _add_fold(sub: Any) -> None:
    p = sub.add_parser("fold", help="fold the patch into the weights (rotate the residual stream)")
    p.add_argument("patched", type=Path, help="checkpoint written by 'lp-deploy patch'")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument(
        "--no-rotate",
        action="store_true",
        help="keep the patch as one explicit MatMul (no untied embeddings)",
    )
    p.add_argument(
        "--calib", default=None, help="verification text (default: the calibration data)"
    )
    p.add_argument("--verify-samples", type=int, default=4)
    p.add_argument("--verify-seqlen", type=int, default=256)
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max |logit diff| / max |logit| allowed against the unfolded model",
    )
    p.set_defaults(handler=_run_fold)


def _run_fold(args: argparse.Namespace) -> int:
    from lp_deploy.fold import FoldConfig, run_fold

    cfg = FoldConfig(
        patched=args.patched,
        out=args.out,
        rotate=not args.no_rotate,
        calib=args.calib,
        verify_samples=args.verify_samples,
        verify_seqlen=args.verify_seqlen,
        tolerance=args.tolerance,
        progress=not args.quiet,
    )
    _, report = run_fold(cfg)
    print(f"\nfold: {report.mode}" + (f" ({report.reason})" if report.reason else ""))
    print(f"patch operations left: {report.patch_ops}")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``lp-deploy`` argument parser."""
    parser = argparse.ArgumentParser(prog="lp-deploy", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS: list[Callable[[Any], None]] = [_add_patch, _add_fold]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lp-deploy`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        handler: Handler = args.handler
        return handler(args)
    except (LpDeployError, FileNotFoundError, ValueError) as exc:
        print(f"lp-deploy {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
