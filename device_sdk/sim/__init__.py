"""Simulated federations: every strategy x seed on the same users, in one process, cached run by run.

``run_strategy`` is imported on first use, so that reading a :class:`SimConfig` (as Flower's ServerApp does) does not
load the model code.
"""

from .config import PRESETS, SimConfig, with_preset

__all__ = ["PRESETS", "SimConfig", "run_strategy", "with_preset"]


def __getattr__(name: str):
    if name == "run_strategy":
        from .runner import run_strategy

        return run_strategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
