"""Peak resident memory of this process (Linux ``/proc``; falls back to ``getrusage``)."""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB, or ``None`` where it cannot be read."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size since process start or the last :func:`reset_peak_rss`, in MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size in MiB (0 where ``/proc`` is unavailable)."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0). Returns whether it worked."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
