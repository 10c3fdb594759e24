"""Strategies with the same two LoRA modules per MLP projection on every device (the paper's Table 1).

Baselines without a router mix their two modules with fixed, equal gates (zero router, never trained), which
matches CoMiGS's trainable parameter count the way the paper does ("2 times LoRA modules"). What travels and how
the server merges it is each name's :class:`~device_sdk.federated.StrategySpec` (FFA-LoRA: only B travels).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from .base import Strategy


@dataclass(frozen=True)
class TwoModules:
    """Two LoRA modules per MLP projection: ``generalists`` of them shared, the rest local."""

    generalists: int = 2

    def adapter_config(self, n_experts: int, rank: int) -> AdapterConfig:
        return AdapterConfig(rank=rank, n_generalists=self.generalists, n_specialists=2 - self.generalists)


def two_modules(name: str, generalists: int, router_mode: str, **policy) -> Strategy:
    """A strategy of two modules per MLP projection, ``generalists`` of them shared."""
    return Strategy(name, shape=TwoModules(generalists), router_mode=router_mode, **policy)


def local() -> Strategy:
    """Local: every device trains alone; nothing leaves it."""
    return two_modules("local", 0, "fixed")


def fedavg() -> Strategy:
    """FedAvg: all LoRA tensors averaged uniformly every round (McMahan et al., 2017)."""
    return two_modules("fedavg", 2, "fixed")


def ffa_lora() -> Strategy:
    """FFA-LoRA (Sun et al., 2024): FedAvg with every A fixed at a common initialisation; only B is trained and
    travels."""
    return two_modules("ffa-lora", 2, "fixed", freeze_lora_a=True)


def centralized() -> Strategy:
    """Centralized: one model with two LoRA modules trained on all users' data (data leaves the devices: an upper
    bound, not a federation)."""
    return two_modules("centralized", 2, "fixed")


def pfedmoe() -> Strategy:
    """pFedMoE (Yi et al., 2024) in the language setting: one shared and one local expert, the router trained
    together with the experts on the training set."""
    return two_modules("pfedmoe", 1, "joint")


def comigs(variant: str) -> Strategy:
    """CoMiGS with two experts: ``2s`` (both specialists), ``2g`` (both generalists), ``1g1s``; routers learn on
    the validation set."""
    generalists = {"2s": 0, "2g": 2, "1g1s": 1}[variant]
    return two_modules(f"comigs-{variant}", generalists, "validation")


# --- the paper's Table 4 ablations: the three expert layouts (2S, 2G, 1G1S) with routers that learn otherwise ---
# Routers stay on the device in all of them, as in CoMiGS, so that each row differs from its CoMiGS counterpart in
# how the router learns and in nothing else.


def local_moe() -> Strategy:
    """Local-MoE: two local experts, the router trained jointly with them on the training set (nothing shared)."""
    return two_modules("local-moe", 0, "joint")


def fedavg_moe() -> Strategy:
    """FedAvg-MoE: two averaged experts, the router trained jointly with them on the training set."""
    return two_modules("fedavg-moe", 2, "joint")


def local_moe_tr() -> Strategy:
    """Local-MoE-tr: two local experts; the router alternates with them (tau, s) on fresh training batches."""
    return two_modules("local-moe-tr", 0, "train")


def fedavg_moe_tr() -> Strategy:
    """FedAvg-MoE-tr: two averaged experts; the router alternates on fresh training batches."""
    return two_modules("fedavg-moe-tr", 2, "train")


def comigs_tr() -> Strategy:
    """CoMiGS-tr: one generalist and one specialist; the router alternates on fresh training batches instead of
    the validation set."""
    return two_modules("comigs-tr", 1, "train")
