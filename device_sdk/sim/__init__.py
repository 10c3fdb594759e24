"""Simulated federations: every strategy x seed on the same users, in one process, cached run by run."""

from .config import PRESETS, SimConfig, with_preset
from .runner import run_strategy

__all__ = ["PRESETS", "SimConfig", "run_strategy", "with_preset"]
