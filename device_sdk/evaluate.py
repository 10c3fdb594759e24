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
from .precision import resolve_precision


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss (nats) over ``tokens`` predicted tokens, and its perplexity."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def autocast(precision: str):
    """CPU bf16 autocast for ``precision`` ``bf16`` (or ``auto`` on a CPU with native bf16), else a no-op context."""
    if resolve_precision(precision) == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
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
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n_windows = math.ceil((min(len(tokens), (max_tokens or len(tokens)) + 1) - 1) / context)
    windows = eval_windows(tokens, context, batch_size, max_tokens, spread=spread)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, total=math.ceil(n_windows / batch_size), desc="evaluate", unit="batch", leave=False)
    for x, y in windows:
        with autocast(precision):
            logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return EvalResult(loss=total / count, tokens=count)


def loss_with(model: nn.Module, tensors: dict[str, torch.Tensor], tokens: np.ndarray, context: int,
              batch_size: int = 8, precision: str = "fp32", max_tokens: int | None = None) -> float:
    """:func:`evaluate`'s loss with ``tensors`` (``{parameter name: tensor}``, same shapes) loaded in place of the
    model's own values, which are restored afterwards (PCL scores peer models this way)."""
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
