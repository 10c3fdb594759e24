"""Deterministic evaluation: mean token loss and perplexity over a whole token stream."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import eval_windows
from .device_select import model_device
from .precision import resolve_precision


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss (nats) over ``tokens`` predicted tokens, and its perplexity."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def autocast(precision: str, device: str | torch.device = "cpu"):
    """The one place autocast is built: bf16 autocast on ``device`` for ``precision`` ``bf16`` (or ``auto`` where
    ``device`` runs bf16 fast, see :func:`device_sdk.precision.resolve_precision`), else a no-op context.

    Args:
        precision: one of :data:`device_sdk.precision.PRECISIONS`.
        device: where the computation runs (``cpu``, ``cuda``, ``cuda:N`` or a :class:`torch.device`); autocast is
            built for its type.

    Returns:
        A context manager: ``torch.autocast(device_type=<cpu|cuda>, dtype=torch.bfloat16)`` or a null context.
    """
    device_type = torch.device(device).type
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, context: int, batch_size: int = 8, precision: str = "fp32",
             max_tokens: int | None = None, progress: bool = False, spread: bool = False) -> EvalResult:
    """Loss over non-overlapping windows of ``context`` tokens covering ``tokens`` (every token predicted once).

    Args:
        model: a causal LM returning ``.logits`` of shape (B, T, V).
        tokens: 1-D token stream.
        max_tokens: evaluate only the first ``max_tokens`` tokens (deterministic prefix), or with ``spread`` that
            many tokens in windows spread evenly over the whole stream (:func:`device_sdk.data.eval_windows`).
        progress: show a progress bar (for command-line use).

    Returns:
        The mean loss and the number of predicted tokens. Batches run on the model's device
        (:func:`device_sdk.device_select.model_device`), under :func:`autocast` for that device.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_windows = math.ceil((min(len(tokens), (max_tokens or len(tokens)) + 1) - 1) / context)
    windows = eval_windows(tokens, context, batch_size, max_tokens, spread=spread)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, total=math.ceil(n_windows / batch_size), desc="evaluate", unit="batch", leave=False)
    for x, y in windows:
        x, y = x.to(device), y.to(device)  # (B, T) each
        with autocast(precision, device):
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return EvalResult(loss=total / count, tokens=count)


def loss_with(model: nn.Module, tensors: dict[str, torch.Tensor], tokens: np.ndarray, context: int,
              batch_size: int = 8, precision: str = "fp32", max_tokens: int | None = None) -> float:
    """:func:`evaluate`'s loss with ``tensors`` (``{parameter name: tensor}``, same shapes) loaded in place of the
    model's own values, which are restored afterwards (PCL scores peer models this way).

    ``tensors`` may live on any device (a server's download is on the CPU); they are copied onto the parameters'
    device.

    Returns:
        The mean loss with ``tensors`` loaded.

    Raises:
        KeyError: if a name in ``tensors`` is not a parameter of the model.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KeyError(f"{len(unknown)} tensor name(s) are not parameters of the model, e.g. {unknown[:3]}")
    own = {name: params[name].detach().clone() for name in tensors}
    try:
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
        return evaluate(model, tokens, context, batch_size, precision, max_tokens=max_tokens).loss
    finally:
        with torch.no_grad():
            for name, t in own.items():
                params[name].copy_(t)
