"""FlexLoRA (Bai et al., 2024): one LoRA per MLP projection with a rank per device (attention LoRA of the expert rank
on every device); the server averages the full updates ``Delta W_i = gamma_i B_i A_i`` weighted by training tokens
and gives each device the best rank-``r_i`` approximation of the average (truncated SVD), split back into ``B`` and
``A`` (:func:`device_sdk.federated.rules.flexlora_rule`). Every module uses its own rank and scale
``gamma = alpha / sqrt(r)`` (paper eq. 4).

The server factorises once, to the largest rank present, with the singular values split evenly between ``B`` and
``A`` and no LoRA scale; a device of rank ``r_i`` and scale ``gamma_i`` keeps the first ``r_i`` components (by
Eckart-Young the best rank-``r_i`` approximation, since singular values come sorted) and divides both factors by
``sqrt(gamma_i)``. One global file thus serves every rank.

The reference CoMiGS code kept only the last client's ``Delta W`` (it overwrote instead of accumulating); here
every upload contributes (tested).
"""

from __future__ import annotations

import torch

from ..federated import Upload, fit
from ..federated.rules import average_delta, svd_factors  # noqa: F401  (re-exported: FlexLoRA's server maths)
from .base import OwnLoss, Strategy
from .ranked import RankedShape


def rescale_to_own_rank(global_tensors: dict[str, torch.Tensor], own: Upload, own_loss: OwnLoss | None,
                        state: dict) -> dict[str, torch.Tensor]:
    """FlexLoRA's receive step: every factor cut to the device's own factor's rank and divided by ``sqrt(gamma)``
    of its module."""
    return {name: fit(global_tensors[name], t.shape) / own.scale_of(name) ** 0.5 for name, t in own.tensors.items()}


def flexlora(match: str) -> Strategy:
    """FlexLoRA with the MLP rank matched to CoMiGS's ``full`` or ``active`` experts."""
    return Strategy(f"flexlora-{match}", shape=RankedShape(match), router_mode="fixed",
                    receive_step=rescale_to_own_rank)
