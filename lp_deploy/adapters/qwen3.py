"""Adapter for Qwen3 (Llama's shape plus per-head q/k RMSNorm)."""

from __future__ import annotations

from lp_deploy.adapters.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    """``Qwen3ForCausalLM``: q_norm/k_norm act per head after the projections, off the stream."""

    model_types = ("qwen3",)
