"""What HetLoRA and FlexLoRA share: one LoRA per MLP projection whose rank follows the device's hardware, so devices
hold factors of different shapes (``A``: (r_i, D_in), ``B``: (D_out, r_i)) under the same names.

As in the paper (section 4.3.1) and the authors' code, only the MLP LoRA's rank is matched to CoMiGS's expert
parameters; the attention projections keep the LoRA every strategy has, of the expert rank (8), so that the
baselines' trainable parameters equal CoMiGS-1GXS's experts (``full``) or its top-2 active experts (``active``).
Every LoRA's scale is ``alpha / sqrt(r)`` with its own rank (paper eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from .base import Strategy, fit


def rank_for(n_experts: int, match: str, expert_rank: int = 8) -> int:
    """MLP LoRA rank matching CoMiGS's expert parameter count (section 4.3.1): ``full`` counts all ``n`` experts
    of rank 8, ``active`` the top-2 that run per token."""
    return expert_rank * (n_experts if match == "full" else min(2, n_experts))


def rank_shape(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape of LoRA factor ``name`` cut to ``rank`` components (A: rows, B: columns; others unchanged); a
    factor of lower rank (the attention LoRA of a device with a larger MLP rank) keeps its own."""
    if name.endswith("lora_A"):
        return (min(rank, shape[0]), *shape[1:])
    if name.endswith("lora_B"):
        return (*shape[:-1], min(rank, shape[-1]))
    return tuple(shape)


def cut(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every tensor zero-padded or truncated to ``shapes[name]``."""
    return {name: fit(tensors[name], shape) for name, shape in shapes.items()}


@dataclass
class RankedLoRA(Strategy):
    """One generalist LoRA per MLP projection of rank ``rank_for(n_i, match)`` and one per attention projection of
    rank ``rank`` (8); no router."""

    match: str = "active"

    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        return AdapterConfig(rank=rank_for(n_experts, self.match, self.rank), attention_rank=self.rank,
                             n_generalists=1, n_specialists=0)

    @property
    def rank_per_device(self) -> bool:
        return True

    def device_shapes(self, shapes, rank):
        """Every factor cut to ``min(rank, its global rank)``: MLP factors to the device's rank; the attention
        factors, of the federation's expert rank on every device (<= any device's MLP rank), keep their shape."""
        return {name: rank_shape(name, shape, rank) for name, shape in shapes.items()}
