"""Strategies with the same two LoRA modules per MLP projection on every device (the paper's Table 1).

Baselines without a router mix their two modules with fixed, equal gates (zero router, never trained), which
matches CoMiGS's trainable parameter count the way the paper does ("2 times LoRA modules").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from ..parts import Role
from .base import Strategy

NOTHING: frozenset[Role] = frozenset()


@dataclass
class TwoModules(Strategy):
    """Two LoRA modules per MLP projection: ``generalists`` of them shared, the rest local."""

    generalists: int = 2

    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        return AdapterConfig(rank=self.rank, n_generalists=self.generalists, n_specialists=2 - self.generalists)


@dataclass
class FrozenA(TwoModules):
    """Two modules whose A matrices never change: only the B matrices travel."""

    def travels(self, name: str) -> bool:
        return not name.endswith("lora_A")


def local() -> Strategy:
    """Local: every device trains alone; nothing leaves it."""
    return TwoModules("local", router_mode="fixed", shared_roles=NOTHING, generalists=0)


def fedavg() -> Strategy:
    """FedAvg: all LoRA tensors averaged uniformly every round (McMahan et al., 2017)."""
    return TwoModules("fedavg", router_mode="fixed", generalists=2)


def ffa_lora() -> Strategy:
    """FFA-LoRA (Sun et al., 2024): FedAvg with every A fixed at a common initialisation; only B is trained and
    travels."""
    return FrozenA("ffa-lora", router_mode="fixed", generalists=2, freeze_lora_a=True)


def centralized() -> Strategy:
    """Centralized: one model with two LoRA modules trained on all users' data (data leaves the devices: an upper
    bound, not a federation)."""
    return TwoModules("centralized", router_mode="fixed", generalists=2, centralized=True)


def pfedmoe() -> Strategy:
    """pFedMoE (Yi et al., 2024) in the language setting: one shared and one local expert, the router trained
    together with the experts on the training set."""
    return TwoModules("pfedmoe", router_mode="joint", generalists=1)


def comigs(variant: str) -> Strategy:
    """CoMiGS with two experts: ``2s`` (both specialists), ``2g`` (both generalists), ``1g1s``; routers learn on
    the validation set."""
    generalists = {"2s": 0, "2g": 2, "1g1s": 1}[variant]
    return TwoModules(f"comigs-{variant}", router_mode="validation", generalists=generalists)


# --- the paper's Table 4 ablations: the three expert layouts (2S, 2G, 1G1S) with routers that learn otherwise ---
# Routers stay on the device in all of them, as in CoMiGS, so that each row differs from its CoMiGS counterpart in
# how the router learns and in nothing else.


def local_moe() -> Strategy:
    """Local-MoE: two local experts, the router trained jointly with them on the training set (nothing shared)."""
    return TwoModules("local-moe", router_mode="joint", shared_roles=NOTHING, generalists=0)


def fedavg_moe() -> Strategy:
    """FedAvg-MoE: two averaged experts, the router trained jointly with them on the training set."""
    return TwoModules("fedavg-moe", router_mode="joint", generalists=2)


def local_moe_tr() -> Strategy:
    """Local-MoE-tr: two local experts; the router alternates with them (tau, s) on fresh training batches."""
    return TwoModules("local-moe-tr", router_mode="train", shared_roles=NOTHING, generalists=0)


def fedavg_moe_tr() -> Strategy:
    """FedAvg-MoE-tr: two averaged experts; the router alternates on fresh training batches."""
    return TwoModules("fedavg-moe-tr", router_mode="train", generalists=2)


def comigs_tr() -> Strategy:
    """CoMiGS-tr: one generalist and one specialist; the router alternates on fresh training batches instead of
    the validation set."""
    return TwoModules("comigs-tr", router_mode="train", generalists=1)
