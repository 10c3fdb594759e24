"""CoMiGS-1GXS: one shared generalist and as many specialists as each device's hardware allows (section 4.3)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from .base import Strategy


@dataclass
class ComigsX(Strategy):
    """Device ``i`` with ``n_i`` experts gets 1 generalist + ``n_i - 1`` specialists; top-2 routing where
    ``n_i >= 2``; all devices share the generalist and the attention LoRA."""

    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        return AdapterConfig(rank=self.rank, n_generalists=1, n_specialists=max(0, n_experts - 1))


def comigs_1gxs() -> Strategy:
    return ComigsX("comigs-1gxs", router_mode="validation", lb_mode="importance")  # generalist-favoured, Table 2
