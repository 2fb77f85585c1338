"""lp-deploy: layer-pruned LLMs with LinearPatch, from fitting to serving."""

from __future__ import annotations

__version__ = "0.1.0"
