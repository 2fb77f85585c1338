"""QA scoring in worker processes gives the scores of one process."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from lp_deploy.benchmarks.qa import Request, evaluate_task, load_task
from lp_deploy.benchmarks.qa_pool import ScoringPool
from lp_deploy.data import default_data_dir
from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Runtime, create_runtime

TASKS = ("copa", "arc_easy")


@pytest.fixture(scope="module")
def qa_dir() -> Path:
    path = default_data_dir()
    if not (path / "copa" / "val.jsonl").is_file() or not (path / "arc").is_dir():
        pytest.skip(f"QA data not found in {path}; set LP_DEPLOY_DATA_DIR")
    return path


def _serial(rt: Runtime, requests: Sequence[Request]) -> list[float]:
    return [lp for lp, _ in rt.loglikelihood([(r.context, r.continuation) for r in requests], 4)]


def test_two_workers_score_like_one_process(tiny_model_dir: Path, qa_dir: Path) -> None:
    """Each chunk's scores equal one process's scores of that chunk (a chunk's batches, and
    so its float rounding, do not depend on the process that scores it)."""
    rt = create_runtime("torch", tiny_model_dir, threads=1)
    requests = [r for t in TASKS for ex in load_task(t, qa_dir, 6) for r in ex.requests]
    chunks = [requests[i : i + 5] for i in range(0, len(requests), 5)]
    with ScoringPool("torch", tiny_model_dir, workers=2, batch_size=4) as pool:
        got = list(pool.imap(chunks))
        single = pool(requests[:3])
        result = evaluate_task("copa", pool, qa_dir, limit=6, progress=False, chunk=2)
    assert len(got) == len(chunks)
    for part, chunk in zip(got, chunks, strict=True):
        assert part == pytest.approx(_serial(rt, chunk), abs=1e-6)
    assert single == pytest.approx(_serial(rt, requests[:3]), abs=1e-6)
    serial = evaluate_task("copa", partial(_serial, rt), qa_dir, limit=6, progress=False, chunk=2)
    assert result.correct == serial.correct and result.acc == serial.acc


def test_a_pool_needs_a_worker(tiny_model_dir: Path) -> None:
    with pytest.raises(LpDeployError, match="--qa-workers must be >= 1"):
        ScoringPool("torch", tiny_model_dir, workers=0)


def test_a_worker_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    died = r"QA worker process .* died.*--qa-workers 1"
    with (
        ScoringPool("torch", tmp_path / "missing", workers=1) as pool,
        pytest.raises(LpDeployError, match=died),
    ):
        pool([Request("a", " b")])
