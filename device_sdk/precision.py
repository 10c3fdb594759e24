"""Which floating-point precision to train and evaluate in on this CPU (or GPU).

bf16 autocast halves a training step's time where the CPU multiplies bf16 natively (x86 with AVX-512, Arm with
BF16; oneDNN's bf16 path) and makes it several times SLOWER where it does not (AVX2-only x86: every bf16 matmul
is emulated; on a 2-core AMD EPYC a training step measured 15.7x slower than fp32, see docs/results.md).
``auto`` picks for the machine at hand. On a CUDA device ``auto`` is bf16 where the GPU supports it
(``torch.cuda.is_bf16_supported()``: Ampere and newer) and fp32 elsewhere.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

#: Accepted values of every ``precision`` setting; ``auto`` resolves to one of the other two.
PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix multiplications natively (fast), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or stripped build: fall back to the vector ISA torch uses
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``fp32`` or ``bf16``: ``precision`` itself, or for ``auto`` what ``device`` runs fast.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the resolved device (``cpu``, ``cuda``, ``cuda:N``) the precision is for; ``auto`` becomes bf16
            on a CPU exactly where :func:`native_bf16`, on a CUDA device where ``torch.cuda.is_bf16_supported()``.

    Returns:
        ``fp32`` or ``bf16``.

    Raises:
        ValueError: for a value outside :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        _log_cuda_choice(chosen)
        return chosen
    chosen = "bf16" if native_bf16() else "fp32"
    _log_choice(chosen)
    return chosen


@functools.cache
def _log_cuda_choice(chosen: str) -> None:
    log.info("precision auto -> %s on cuda (torch.cuda.is_bf16_supported() is %s)", chosen, chosen == "bf16")


@functools.cache
def _log_choice(chosen: str) -> None:
    if chosen == "fp32":
        log.info("precision auto -> fp32: this CPU (%s) has no native bf16, where bf16 autocast is several times "
                 "slower than fp32", torch.backends.cpu.get_cpu_capability())
    else:
        log.info("precision auto -> bf16 (native bf16 on this CPU)")


__all__ = ["PRECISIONS", "native_bf16", "resolve_precision"]
