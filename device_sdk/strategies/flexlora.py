"""FlexLoRA (Bai et al., 2024): one LoRA per MLP projection with a rank per device (attention LoRA of the expert rank
on every device); the server averages the full updates ``Delta W_i = gamma_i B_i A_i`` weighted by training tokens
and gives each device the best rank-``r_i`` approximation of the average (truncated SVD), split back into ``B`` and
``A``. Every module uses its own rank and scale ``gamma = alpha / sqrt(r)`` (paper eq. 4).

The server factorises once, to the largest rank present, with the singular values split evenly between ``B`` and
``A`` and no LoRA scale; a device of rank ``r_i`` and scale ``gamma_i`` keeps the first ``r_i`` components (by
Eckart-Young the best rank-``r_i`` approximation, since singular values come sorted) and divides both factors by
``sqrt(gamma_i)``. One global file thus serves every rank.

The reference CoMiGS code kept only the last client's ``Delta W`` (it overwrote instead of accumulating); here
every upload contributes (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Upload, fit, lora_pairs
from .ranked import RankedLoRA


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
    """Token-weighted mean over devices of ``gamma_i B_i A_i`` (D_out, D_in), in float64 (``gamma_i`` the module's
    scale on device ``i``, from its rank)."""
    total = sum(u.tokens for u in uploads)
    acc = None
    for u in uploads:
        w = u.tokens / total if total > 0 else 1 / len(uploads)
        delta = u.scale_of(a_name) * (u.tensors[b_name].to(torch.float64) @ u.tensors[a_name].to(torch.float64))
        acc = w * delta if acc is None else acc + w * delta
    return acc


@dataclass
class FlexLoRA(RankedLoRA):
    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        """Per module: the token-weighted mean ``Delta W``, factorised to the largest uploaded rank (scale 1)."""
        merged = {}
        for a_name, b_name in lora_pairs(uploads[0].tensors).values():
            rank = max(u.tensors[a_name].shape[0] for u in uploads)
            merged[a_name], merged[b_name] = svd_factors(average_delta(uploads, a_name, b_name), rank, 1.0)
        return merged

    def receive(self, global_tensors, own, own_loss=None):
        """Every factor cut to the device's own factor's rank and divided by ``sqrt(gamma)`` of its module."""
        return {name: fit(global_tensors[name], t.shape) / own.scale_of(name) ** 0.5
                for name, t in own.tensors.items()}


def flexlora(match: str) -> FlexLoRA:
    return FlexLoRA(f"flexlora-{match}", router_mode="fixed", match=match)
