"""What machine a measurement ran on: recorded with every simulation run and benchmark, because bf16 numerics and
speed depend on the CPU's instruction set (native bf16 on AVX-512 / AMX, emulated on AVX2)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> dict:
    """``{"cpus", "torch", "python", "machine", "cpu", "isa"}``: threads torch uses, versions, CPU model and the
    vector instruction set torch dispatches to (``AVX2``, ``AVX512``, ...)."""
    return {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability()}


__all__ = ["cpu_model", "host"]
