"""Load benchmark of a served generate model: N concurrent clients vs 1 client, side by side.

Every request's answer must equal its single-request answer (the 1-client pass gives the
reference for each prompt; greedy decoding); errors are counted, not hidden. Reported: end to
end latency p50/p99, time to first token, inter-token latency, tokens/s, and the throughput
ratio N clients / 1 client. Loopback only; the server is started (and stopped by its PID)
unless a running one is given.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lp_deploy.artifacts import ONNX_FILE, clean_json
from lp_deploy.serving import client
from lp_deploy.serving.server import ServerConfig, TritonServer
from lp_deploy.serving.triton_repo import TritonRepoConfig, build_repo

from .latency import quantile

PROMPTS = (
    "The history of the city of Paris",
    "A short guide to growing tomatoes:",
    "The river valley was first settled",
    "In the winter of 1812, the army",
    "The most important rule of cooking is",
    "Photosynthesis is the process by which",
    "The old lighthouse keeper looked at the sea and",
    "Here is a recipe for bread:",
    "The first computers were built",
    "Once upon a time, in a small village,",
    "The capital of Australia is",
    "Mathematics is the study of",
    "The train left the station at",
    "My favourite book is",
    "The football match ended with",
    "Volcanoes form when",
    "The museum opened a new exhibition about",
    "To learn a new language, you should",
    "The company announced that its profits",
    "At the top of the mountain there was",
)


@dataclass
class ServingBenchConfig:
    """``source``: an ONNX export (a repository is built in a temporary dir) or a model
    repository; ``url``/``grpc_url``: a running server instead of starting one."""

    source: Path | None = None
    model: str = "bench"
    clients: int = 8
    requests: int = 20  # per client
    max_tokens: int = 32
    protocol: str = "http-stream"
    max_batch: int = 8
    threads: int = 1
    url: str | None = None
    grpc_url: str | None = None
    out: Path | None = None  # a JSON file for the figures


@dataclass
class PassResult:
    """One load pass: ``clients`` clients, each sending its requests one after the other."""

    clients: int
    requests: int
    errors: int
    mismatches: int
    seconds: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    error_messages: list[str] = field(default_factory=list)


@dataclass
class ServingBenchResult:
    model: str
    protocol: str
    max_tokens: int
    single: PassResult
    concurrent: PassResult
    throughput_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return clean_json(asdict(self))


def _ms(values: list[float], q: float) -> float:
    return quantile(values, q) * 1e3 if values else float("nan")


def _run_pass(
    cfg: ServingBenchConfig,
    url: str,
    grpc_url: str | None,
    clients: int,
    reference: dict[int, list[int]] | None,
) -> tuple[PassResult, dict[int, list[int]]]:
    """``clients`` threads x ``cfg.requests`` requests; request j of each client uses prompt
    j; answers checked against ``reference`` (or recorded as it)."""
    results: list[tuple[int, client.Generation | Exception]] = []

    def one_client(_: int) -> list[tuple[int, client.Generation | Exception]]:
        out: list[tuple[int, client.Generation | Exception]] = []
        for j in range(cfg.requests):
            prompt = PROMPTS[j % len(PROMPTS)]
            try:
                out.append(
                    (
                        j,
                        client.generate(
                            url, cfg.model, prompt, cfg.protocol, cfg.max_tokens, grpc_url=grpc_url
                        ),
                    )
                )
            except Exception as exc:  # counted and reported
                out.append((j, exc))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for chunk in pool.map(one_client, range(clients)):
            results += chunk
    seconds = time.perf_counter() - start
    gens = [(j, g) for j, g in results if isinstance(g, client.Generation)]
    errors = [str(g) for _, g in results if isinstance(g, Exception)]
    answers = reference if reference is not None else {}
    mismatches = 0
    for j, g in gens:
        if reference is None:
            answers.setdefault(j % len(PROMPTS), g.token_ids)
        if answers.get(j % len(PROMPTS)) != g.token_ids:
            mismatches += 1
    tokens = sum(len(g.token_ids) for _, g in gens)
    itl = [b - a for _, g in gens for a, b in zip(g.times, g.times[1:], strict=False)]
    lat = [g.total for _, g in gens]
    ttft = [g.first_token for _, g in gens]
    return (
        PassResult(
            clients,
            len(results),
            len(errors),
            mismatches,
            seconds,
            tokens,
            tokens / seconds,
            len(gens) / seconds,
            _ms(lat, 0.5),
            _ms(lat, 0.99),
            _ms(ttft, 0.5),
            _ms(ttft, 0.99),
            statistics.median(itl) * 1e3 if itl else float("nan"),
            errors[:5],
        ),
        answers,
    )


def _bench(cfg: ServingBenchConfig, url: str, grpc_url: str | None) -> ServingBenchResult:
    client.generate(url, cfg.model, PROMPTS[0], cfg.protocol, 4, grpc_url=grpc_url)  # warm-up
    single, reference = _run_pass(cfg, url, grpc_url, 1, None)
    if single.tokens == 0:  # no reference, no ratio: say why
        raise client.ServingError(
            f"every request of the 1-client pass failed ({single.errors} errors): "
            + "; ".join(single.error_messages)
        )
    concurrent, _ = _run_pass(cfg, url, grpc_url, cfg.clients, reference)
    return ServingBenchResult(
        cfg.model,
        cfg.protocol,
        cfg.max_tokens,
        single,
        concurrent,
        concurrent.tokens_per_s / single.tokens_per_s,
    )


def run_serving_bench(cfg: ServingBenchConfig) -> ServingBenchResult:
    """Run the benchmark (starting and stopping a server unless ``cfg.url`` is given)."""
    if cfg.url:
        result = _bench(cfg, cfg.url, cfg.grpc_url)
    else:
        if cfg.source is None:
            raise ValueError("give a source (ONNX export or model repository) or a server url")
        with tempfile.TemporaryDirectory(prefix="lp-deploy-bench-") as tmp:
            repo = Path(cfg.source)
            if (repo / ONNX_FILE).is_file():
                repo = build_repo(
                    TritonRepoConfig(
                        Path(cfg.source),
                        Path(tmp) / "repo",
                        name=cfg.model,
                        max_batch=cfg.max_batch,
                        threads=cfg.threads,
                        max_tokens=cfg.max_tokens,
                    )
                ).repo
            with TritonServer(ServerConfig(repo, 0, 0, [cfg.model])) as server:
                result = _bench(cfg, server.url, server.grpc_url)
    if cfg.out is not None:
        Path(cfg.out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def format_result(r: ServingBenchResult) -> str:
    """A short Markdown table of the two passes and the ratio."""
    rows = [
        "| clients | requests | errors | mismatches | tokens/s | req/s | latency p50 / p99 (ms) "
        "| TTFT p50 / p99 (ms) | ITL p50 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (r.single, r.concurrent):
        rows.append(
            f"| {p.clients} | {p.requests} | {p.errors} | {p.mismatches} | {p.tokens_per_s:.1f} "
            f"| {p.requests_per_s:.2f} | {p.latency_p50_ms:.0f} / {p.latency_p99_ms:.0f} "
            f"| {p.ttft_p50_ms:.0f} / {p.ttft_p99_ms:.0f} | {p.itl_p50_ms:.1f} |"
        )
    rows.append(
        f"\nthroughput {r.concurrent.clients} clients / 1 client: {r.throughput_ratio:.2f}x "
        f"({r.protocol}, {r.max_tokens} tokens per request, greedy)"
    )
    return "\n".join(rows)
