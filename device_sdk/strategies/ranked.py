"""What HetLoRA and FlexLoRA share: one LoRA per MLP projection whose rank follows the device's hardware, so devices
hold factors of different shapes (``A``: (r_i, D_in), ``B``: (D_out, r_i)) under the same names.

As in the paper (section 4.3.1) and the authors' code, only the MLP LoRA's rank is matched to CoMiGS's expert
parameters; the attention projections keep the LoRA every strategy has, of the expert rank (8), so that the
baselines' trainable parameters equal CoMiGS-1GXS's experts (``full``) or its top-2 active experts (``active``).
Every LoRA's scale is ``alpha / sqrt(r)`` with its own rank (paper eq. 4). How the shapes are cut per device is
the server side's (:meth:`device_sdk.federated.StrategySpec.device_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from ..federated.tensors import cut, rank_shape  # noqa: F401  (re-exported: the helpers of ranked strategies)


def rank_for(n_experts: int, match: str, expert_rank: int = 8) -> int:
    """MLP LoRA rank matching CoMiGS's expert parameter count (section 4.3.1): ``full`` counts all ``n`` experts
    of rank 8, ``active`` the top-2 that run per token."""
    return expert_rank * (n_experts if match == "full" else min(2, n_experts))


@dataclass(frozen=True)
class RankedShape:
    """One generalist LoRA per MLP projection of rank ``rank_for(n_i, match)`` and one per attention projection of
    the expert rank (8); no router."""

    match: str = "active"

    def adapter_config(self, n_experts: int, rank: int) -> AdapterConfig:
        return AdapterConfig(rank=rank_for(n_experts, self.match, rank), attention_rank=rank,
                             n_generalists=1, n_specialists=0)
