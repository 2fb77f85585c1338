"""Benchmarks: perplexity, zero-shot QA, latency, memory, FLOPs, reports, sweeps, lm-eval.

This folder (``benchmarks/`` in the repository) is installed as ``lp_deploy.benchmarks``:
import ``lp_deploy.benchmarks.bench``, ``lp_deploy.benchmarks.qa``, etc. The benchmarks sit
above every other layer and may import all of them; nothing but the CLI imports them.
"""
