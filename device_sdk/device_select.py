"""Which torch device to train and evaluate on: the one home of device resolution.

``auto`` (the default of every ``device`` setting) is ``cuda`` when ``torch.cuda.is_available()`` and ``cpu``
otherwise; ``cuda`` / ``cuda:N`` asked for on a machine without a usable GPU is a :class:`ConfigError` that says
what to do. A built configuration holds the resolved device, never ``auto``.
"""

from __future__ import annotations

import functools
import logging
import platform
import re

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

#: The forms a ``device`` setting accepts (``cuda:N`` names one GPU by index).
DEVICES = ("auto", "cpu", "cuda", "cuda:N")

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def resolve_device(device: str | torch.device = "auto") -> str:
    """The device to run on: ``cpu``, ``cuda`` or ``cuda:N``.

    Args:
        device: ``auto`` (``cuda`` when ``torch.cuda.is_available()``, else ``cpu``), ``cpu``, ``cuda`` or
            ``cuda:N``; a :class:`torch.device` of those types is accepted too. Resolving a resolved value returns it.

    Returns:
        The resolved device as a string (``auto`` never survives).

    Raises:
        ConfigError: for any other value, for ``cuda``/``cuda:N`` when PyTorch sees no CUDA device, and for an index
            beyond the visible CUDA devices. Each message names the fix.
    """
    text = str(device).strip().lower()
    if text == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        _log_auto(chosen)
        return chosen
    if text == "cpu":
        return "cpu"
    index_match = _CUDA_INDEX.fullmatch(text)
    if text != "cuda" and index_match is None:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (N a GPU index such as 0), got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {text!r} was asked for but PyTorch sees no CUDA GPU (torch {torch.__version__}, built with "
            f"CUDA {torch.version.cuda or 'none'}); use --device cpu or --device auto (device='cpu' / 'auto'), "
            "or install a CUDA build of PyTorch and check the GPU driver with nvidia-smi")
    if index_match is not None:
        index, count = int(index_match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {text!r} was asked for but only {count} CUDA device(s) are visible "
                              f"(cuda:0 .. cuda:{count - 1}); pick one of them, or check CUDA_VISIBLE_DEVICES")
        return f"cuda:{index}"
    return "cuda"


@functools.cache
def _log_auto(chosen: str) -> None:
    log.info("device auto -> %s (torch.cuda.is_available() is %s)", chosen, chosen == "cuda")


def resolve_placement(device: str, precision: str) -> tuple[str, str, list[str]]:
    """A configuration's ``(device, precision)`` resolved, and its problems (one line each; none when both hold).

    The device resolves first: what ``auto`` precision means depends on it. Where the device is invalid the
    precision is only checked, not resolved. The one rule of every configuration that has both settings.
    """
    from .precision import PRECISIONS, resolve_precision

    problems = []
    try:
        device = resolve_device(device)
    except ConfigError as err:
        problems.append(str(err))
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {precision!r}")
    elif not problems:
        precision = resolve_precision(precision, device)
    return device, precision, problems


def device_name(device: str | torch.device) -> str:
    """A human-readable name of a resolved device for reports: the GPU's name on CUDA, the CPU's otherwise.

    Args:
        device: a resolved device (``cpu``, ``cuda`` or ``cuda:N``).

    Returns:
        E.g. ``"NVIDIA H200"`` or ``"cpu (x86_64)"``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (its first one; ``cpu`` for a model without parameters).

    Args:
        model: any module.

    Returns:
        The :class:`torch.device` inputs to ``model`` must be on.
    """
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two devices are the same, ``cuda`` without an index meaning the current CUDA device.

    Args:
        a, b: devices or device strings (``cpu``, ``cuda``, ``cuda:N``).

    Returns:
        True when tensors on ``a`` and on ``b`` live on the same device.
    """
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    if a.index is not None and b.index is not None:
        return False
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def check_model_device(model: nn.Module, device: str) -> None:
    """Check that ``model`` lives on ``device`` (the configuration's resolved device).

    Args:
        model: the model about to be trained.
        device: the resolved device of its configuration.

    Raises:
        ConfigError: naming both devices and how to make them agree.
    """
    actual = model_device(model)
    if not same_device(actual, device):
        raise ConfigError(f"the model is on {actual} but its configuration says device={device!r}; move the model "
                          f"with model.to({device!r}) or configure device={str(actual)!r}")


__all__ = ["DEVICES", "check_model_device", "device_name", "model_device", "resolve_device", "resolve_placement",
           "same_device"]
