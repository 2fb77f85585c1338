"""``--select ppl``: held-back loss of each patched candidate block from cached states."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, make_tiny_model

from lp_deploy.calibration import (
    CalibrationSpec,
    holdout_windows,
    load_text,
    sample_starts,
    tokenize_text,
)
from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError, PruningPlanError
from lp_deploy.model import LoadedModel
from lp_deploy.perplexity import model_perplexity
from lp_deploy.pipeline import Calibrated, PatchConfig, calibrate, run_patch
from lp_deploy.selection import Gap, SelectionOptions, make_plan, select, select_cosine

#: |score - log ppl of the pruned model|: float32 forward of the same ops (lstsq-mlp: the
#: map is folded into down_proj weights in the model, applied after it in the score)
LOSS_TOL = 1e-4
SEQLEN = 32


def _calibrated(text_file: Path, arch: str = "llama", layers: int = 6) -> Calibrated:
    model = make_tiny_model(arch, num_layers=layers, sliding=arch in ("mistral", "gemma3"))
    spec = CalibrationSpec(str(text_file), samples=4, seqlen=SEQLEN)
    cal = calibrate(LoadedModel(model, build_tokenizer()), spec, progress=False)
    cal.holdout = 3
    return cal


@pytest.mark.parametrize(
    ("arch", "kind", "gap"),
    [
        ("llama", "rotate", Gap(2, 4)),
        ("llama", "none", Gap(4, 6)),  # a gap ending at the last layer: the final norm
        ("llama", "lstsq-mlp", Gap(1, 3)),  # folded into layer 0's down_proj
        ("llama", "lstsq-mlp", Gap(0, 2)),  # no layer before: falls back to lstsq
        ("gemma3", "diag", Gap(1, 3)),  # sqrt(d) embeddings, sliding/global layers
        ("granite", "rotate", Gap(2, 5)),  # multipliers, scaled logits
    ],
)
def test_score_is_the_loss_of_the_pruned_and_patched_model(
    text_file: Path, arch: str, kind: str, gap: Gap
) -> None:
    cal = _calibrated(text_file, arch)
    [score] = cal.block_losses([gap], kind)
    plan = make_plan(cal.num_layers, list(range(gap.start, gap.end)), "manual")
    pruned = cal.prune(plan, kind)
    assert cal.scorer is not None
    windows = torch.cat(cal.scorer.batches)
    want = math.log(model_perplexity(pruned.model, windows, progress=False))
    assert abs(score - want) < LOSS_TOL, (score, want)


def test_holdout_windows_share_no_token_with_the_fitting_windows(text_file: Path) -> None:
    spec = CalibrationSpec(str(text_file), samples=8, seqlen=SEQLEN, seed=3)
    tok = build_tokenizer()
    ids = tokenize_text(tok, load_text(text_file))
    fit = sample_starts(ids.numel(), spec.samples, SEQLEN, spec.seed)
    held = spec.holdout(tok, 20)
    assert held.shape == (20, SEQLEN)
    starts = [
        s
        for s in range(0, ids.numel() - SEQLEN + 1, SEQLEN)
        if any(torch.equal(ids[s : s + SEQLEN], w) for w in held)
    ]
    assert len(starts) >= 20
    assert all(t + SEQLEN <= s or s + SEQLEN <= t for s in starts for t in fit)
    torch.testing.assert_close(spec.windows(tok), torch.stack([ids[t : t + SEQLEN] for t in fit]))
    with pytest.raises(LpDeployError, match=r"only \d+ windows .* do not overlap"):
        holdout_windows(ids, fit, ids.numel() // SEQLEN, SEQLEN, 0)


def test_ppl_selection_picks_the_block_of_lowest_score(text_file: Path) -> None:
    cal = _calibrated(text_file)
    plan = cal.plan(2, "ppl", "rotate")
    s = plan.scores
    scored = [x for x in s["candidates"] if x is not None]
    assert len(scored) == s["scored"] == cal.num_layers - 1
    assert s["loss"] == min(scored) and plan.gaps[0].start == s["candidates"].index(s["loss"])
    assert s["ppl"] == pytest.approx(math.exp(s["loss"]))
    assert (
        s["seconds"] >= 0 and s["similarities"] == select_cosine(cal.stats, 2).scores["candidates"]
    )
    again = cal.block_losses([plan.gaps[0]], "rotate")  # cached states: same score
    assert again == [s["loss"]]


def test_candidates_restricts_to_the_best_cosine_blocks(text_file: Path) -> None:
    cal = _calibrated(text_file)
    sims = select_cosine(cal.stats, 2).scores["candidates"]
    top = sorted(range(len(sims)), key=lambda i: -sims[i])[:2]
    plan = cal.plan(2, "ppl", "rotate", candidates=2)
    scored = [i for i, x in enumerate(plan.scores["candidates"]) if x is not None]
    assert scored == sorted(top) and plan.gaps[0].start in top
    assert plan.scores["scored"] == 2
    one = cal.plan(2, "ppl", "rotate", candidates=1)
    assert one.gaps == select_cosine(cal.stats, 2).gaps
    assert cal.plan(2, "ppl", "rotate", candidates=99).scores["scored"] == len(sims)


def test_bad_values_get_clear_errors(text_file: Path) -> None:
    cal = _calibrated(text_file)
    with pytest.raises(PruningPlanError, match="--candidates must be at least 1"):
        cal.plan(2, "ppl", "rotate", candidates=0)
    with pytest.raises(PruningPlanError, match="--candidates applies to --select ppl only"):
        cal.plan(2, "cosine", candidates=3)
    with pytest.raises(LpDeployError, match="needs the patch kind"):
        cal.plan(2, "ppl")
    with pytest.raises(PruningPlanError, match="needs a block scorer"):
        select(cal.stats, cal.num_layers, 2, "ppl", SelectionOptions())
    with pytest.raises(LpDeployError, match="unknown patch kind"):
        cal.plan(2, "ppl", "bogus")
    with pytest.raises(LpDeployError, match="--holdout must be at least 1"):
        run_patch(PatchConfig(model="unused", select="ppl", prune=2, holdout=0))


def test_multi_gap_plans_still_work_beside_ppl(text_file: Path) -> None:
    cal = _calibrated(text_file)
    cal.plan(1, "ppl", "rotate")
    for plan in (cal.plan(3, "bi"), cal.plan(None, "0,3,4")):
        pruned = cal.prune(plan, "rotate")
        assert len(pruned.adapter.layers) == cal.num_layers - 3
    assert len(cal.plan(None, "0,3,4").gaps) == 2


def test_cli_patch_and_sweep_with_ppl(
    tmp_path: Path, tiny_model_dir: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = ["--calib", str(text_file), "--samples", "4", "--seqlen", str(SEQLEN)]
    ppl = ["--holdout", "2", "--candidates", "3"]
    out = tmp_path / "p"
    argv = ["-q", "patch", str(tiny_model_dir), "--prune", "2", "--select", "ppl"]
    assert main([*argv, *calib, *ppl, "--out", str(out)]) == 0
    assert "held-back loss" in capsys.readouterr().out
    from lp_deploy.checkpoint import read_meta

    plan = read_meta(out)["plan"]
    assert plan["method"] == "ppl" and plan["scores"]["scored"] == 3
    sweep = ["-q", "sweep", str(tiny_model_dir), "--prune", "1,2", "--select", "ppl"]
    sweep += [*calib, *ppl, "--patches", "none,rotate,rotate+fold", "--ppl", "none"]
    assert main([*sweep, "--out", str(tmp_path / "s")]) == 0
    import json

    points = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    assert [p["scores"]["scored"] for p in points] == [3] * 6
    by = {(p["prune"], p["patch"]): p for p in points}
    assert by[(2, "rotate")]["removed"] == by[(2, "rotate+fold")]["removed"]
    assert main([*argv, *calib, "--candidates", "0", "--out", str(tmp_path / "q")]) == 2
    assert "--candidates must be at least 1" in capsys.readouterr().err
