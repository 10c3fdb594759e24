"""FlexLoRA (Bai et al., 2024): one LoRA per projection with a rank per device; the server averages the full
updates ``Delta W_i = gamma_i B_i A_i`` weighted by training tokens and gives each device the best rank-``r_i``
approximation of the average (truncated SVD), split back into ``B`` and ``A``.

The reference CoMiGS code kept only the last client's ``Delta W`` (it overwrote instead of accumulating); here
every upload contributes (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdapterConfig
from .base import Strategy, Upload, lora_pairs
from .hetlora import rank_for


def svd_factors(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the best rank-``rank`` approximation of ``delta`` (D_out, D_in).

    Returns:
        ``A`` (rank, D_in) and ``B`` (D_out, rank), the singular values split evenly between them.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scale).sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a.float(), b.float()


def average_delta(uploads: list[Upload], a_name: str, b_name: str) -> torch.Tensor:
    """Token-weighted mean over devices of ``gamma_i B_i A_i`` (D_out, D_in), in float64."""
    total = sum(u.tokens for u in uploads)
    acc = None
    for u in uploads:
        w = u.tokens / total if total > 0 else 1 / len(uploads)
        delta = u.scale * (u.tensors[b_name].to(torch.float64) @ u.tensors[a_name].to(torch.float64))
        acc = w * delta if acc is None else acc + w * delta
    return acc


@dataclass
class FlexLoRA(Strategy):
    match: str = "active"

    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        return AdapterConfig(rank=rank_for(n_experts, self.match, self.rank), n_generalists=1, n_specialists=0)

    def aggregate(self, uploads: list[Upload], peer_loss=None):
        out = [{} for _ in uploads]
        for a_name, b_name in lora_pairs(uploads[0].tensors).values():
            delta = average_delta(uploads, a_name, b_name)
            for mine, u in zip(out, uploads):
                mine[a_name], mine[b_name] = svd_factors(delta, u.rank, u.scale)
        return out


def flexlora(match: str) -> FlexLoRA:
    return FlexLoRA(f"flexlora-{match}", router_mode="fixed", match=match)
