"""Exceptions raised by lp-deploy. Each message names the problem and the fix."""

from __future__ import annotations


class LpDeployError(Exception):
    """Base class of every error lp-deploy raises on purpose."""


class UnsupportedArchitectureError(LpDeployError):
    """The model's architecture has no adapter."""


class PruningPlanError(LpDeployError, ValueError):
    """The requested pruning plan is impossible for this model."""


class CheckpointError(LpDeployError):
    """A patched checkpoint is missing, corrupt or does not match its config."""


class ModelSourceError(LpDeployError, FileNotFoundError):
    """A model source (path, alias, hub id, GGUF file) cannot be resolved."""


class VerificationError(LpDeployError):
    """A stage's own exactness check failed; nothing was written."""


class DataError(LpDeployError, FileNotFoundError):
    """A data file (calibration, evaluation, QA) cannot be found or read."""


class OutputExistsError(LpDeployError, FileExistsError):
    """``--out`` names something that is not a previous artifact of the same kind."""
