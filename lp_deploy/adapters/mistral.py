"""Adapter for Mistral (Llama's shape; optional sliding-window attention)."""

from __future__ import annotations

from lp_deploy.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    """``MistralForCausalLM``: same module names as Llama."""

    model_types = ("mistral",)
