"""Adapter for Qwen2 (Llama's shape plus q/k/v biases and per-layer attention types)."""

from __future__ import annotations

from lp_deploy.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """``Qwen2ForCausalLM``: q/k/v biases read the stream and survive rotation unchanged."""

    model_types = ("qwen2",)
