"""CoMiGS-1GXS: one shared generalist and as many specialists as each device's hardware allows (section 4.3)."""

from __future__ import annotations

from .base import GeneralistPlusSpecialists, Strategy


def comigs_1gxs() -> Strategy:
    """Device ``i`` with ``n_i`` experts gets 1 generalist + ``n_i - 1`` specialists; top-2 routing where
    ``n_i >= 2``; all devices share the generalist and the attention LoRA; generalist-favoured load balancing
    (Table 2)."""
    return Strategy("comigs-1gxs", shape=GeneralistPlusSpecialists(), router_mode="validation", lb_mode="importance")
