"""Helpers shared by the benchmarks: tables, JSON output, a fresh adapted model."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


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
    return {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability()}


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"host": host(), **payload}, indent=1))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats with 3 significant digits)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
