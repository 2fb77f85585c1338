"""QA log-likelihood scoring in worker processes, each with its own runtime.

On a CPU, one scoring process per core runs each at the speed of a lone process (two ONNX
Runtime processes of one thread: 2.0x the requests per second of one; one process of two
threads: 1.7x), so ``lp-deploy bench --qa-workers N`` spreads the chunks of every task over N
processes. A chunk's log-likelihoods do not depend on which worker scored it (every worker runs
the same runtime with the same threads); they equal those of one process within float
rounding (1e-6 measured, ``tests/test_qa_pool.py``). Workers are spawned, so a script that
makes a pool needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import Any

from lp_deploy.benchmarks.qa import Request
from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import Runtime, create_runtime

_worker: dict[str, Any] = {}  # this worker process's runtime and batch size


def _start_worker(kind: str, source: str, options: dict[str, Any], batch_size: int) -> None:
    import torch

    torch.set_num_threads(int(options.get("threads") or 1))
    _worker["runtime"] = create_runtime(kind, source, **options)
    _worker["batch_size"] = batch_size


def _score(requests: Sequence[Request]) -> list[float]:
    runtime: Runtime = _worker["runtime"]
    pairs = [(r.context, r.continuation) for r in requests]
    return [lp for lp, _ in runtime.loglikelihood(pairs, _worker["batch_size"])]


class ScoringPool:
    """``workers`` processes that each load ``create_runtime(kind, source, **options)`` (one
    thread each unless ``options`` says ``threads``); a :data:`LoglikelihoodFn` whose
    :meth:`imap` scores chunks in parallel, results in order."""

    def __init__(
        self,
        kind: str,
        source: str | Path,
        workers: int,
        batch_size: int = 8,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if workers < 1:
            raise LpDeployError(f"--qa-workers must be >= 1, got {workers}")
        opts = {"threads": 1, **(options or {})}
        self._what = f"a QA worker process ({kind} runtime of {source})"
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(kind, str(source), opts, batch_size),
        )

    def __call__(self, requests: Sequence[Request]) -> list[float]:
        return next(self.imap([requests]))

    def imap(self, chunks: Iterable[Sequence[Request]]) -> Iterator[list[float]]:
        """Each chunk's log-likelihoods, in order, scored as workers come free."""
        try:
            yield from self._pool.map(_score, [list(c) for c in chunks])
        except BrokenProcessPool as e:
            raise LpDeployError(
                f"{self._what} died (failed to load, or killed: out of memory?); its error is "
                "on stderr above. --qa-workers 1 scores in this process and shows it here"
            ) from e

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
