"""HetLoRA (Cho et al., 2023): one LoRA per MLP projection with a rank per device (attention LoRA of the expert rank
on every device); the server zero-pads every device's A and B to the largest rank and averages them weighted by the
norm of each device's update ``||gamma_i B_i A_i||_F`` (:func:`device_sdk.federated.rules.hetlora_rule`); each
device keeps the first ``r_i`` rank components of the result (truncation), zero beyond its active rank.

Local training adds the rank self-pruning regulariser ``lambda * sum ||B[:, p:] A[p:, :]||_F`` over the MLP LoRA's
rank components beyond ``p = floor(pruning * r)``; when that tail shrank over a round, the device's active rank
drops to ``p`` (pruned components are zeroed and stay zero). Pruning acts on the MLP LoRA only, as in the authors'
code (its pruning loss covers ``c_fc`` / ``c_proj``); the attention LoRA keeps its rank. Appendix C.3: pruning
strength 0.99, lambda swept in {5e-2, 5e-3, 5e-4}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..federated import Upload, fit, lora_pairs, rank_shape
from ..inject import adapter_config
from ..parts import Role, role_parameters
from .base import OwnLoss, Strategy
from .ranked import RankedShape

#: Roles of the MLP LoRA, the only one the rank self-pruning acts on (the attention LoRA keeps its rank).
MLP_ROLES: frozenset[Role] = frozenset({Role.GENERALIST, Role.SPECIALIST})


def tail_norm(model: nn.Module, keep: int) -> torch.Tensor:
    """``sum over MLP LoRA modules of ||B[:, keep:] @ A[keep:, :]||_F``, through ``tr((B^T B)(A A^T))``
    (``A`` (r, D_in), ``B`` (D_out, r))."""
    params = role_parameters(model, MLP_ROLES)
    total = torch.zeros(())
    for a_name, b_name in lora_pairs(params).values():
        a, b = params[a_name][keep:], params[b_name][:, keep:]
        if a.shape[0] == 0:
            continue
        gram = (b.t() @ b) * (a @ a.t())  # (tail, tail)
        total = total + gram.sum().clamp_min(0).add(1e-12).sqrt()
    return total


def active_rank(state: dict, user: int, rank: int) -> int:
    """``user``'s active MLP rank (its full ``rank`` until it prunes), kept in the strategy's ``state``."""
    return state.setdefault("active_rank", {}).setdefault(str(user), rank)


@dataclass(frozen=True)
class RankPruning:
    """HetLoRA's local-training hooks: the tail regulariser (strength ``reg``) and the rank self-pruning."""

    reg: float = 5e-3
    pruning: float = 0.99

    def regularizer(self, user: int, state: dict):
        def reg(model: nn.Module) -> torch.Tensor:
            active = active_rank(state, user, adapter_config(model).rank)  # the MLP LoRA's rank
            return self.reg * tail_norm(model, math.floor(self.pruning * active))
        return reg

    def _tail(self, user: int, model: nn.Module, state: dict) -> float:
        rank = adapter_config(model).rank  # the MLP LoRA's rank
        with torch.no_grad():
            return float(tail_norm(model, math.floor(self.pruning * active_rank(state, user, rank))))

    def begin_round(self, user: int, model: nn.Module, state: dict) -> None:
        state.setdefault("tail_before", {})[str(user)] = self._tail(user, model, state)

    def end_round(self, user: int, model: nn.Module, state: dict) -> None:
        """Prune ``user``'s active MLP rank when its regularised tail shrank during the round (its upload then
        already carries the pruned components, zeroed; the attention LoRA is never pruned)."""
        before = state.get("tail_before", {}).get(str(user))
        if before is not None and self._tail(user, model, state) < before:
            ranks = state["active_rank"]
            ranks[str(user)] = max(1, math.floor(self.pruning * ranks[str(user)]))
            keep = ranks[str(user)]
            with torch.no_grad():
                params = role_parameters(model, MLP_ROLES)
                for a_name, b_name in lora_pairs(params).values():
                    params[a_name][keep:].zero_()
                    params[b_name][:, keep:].zero_()


def truncate_to_active_rank(global_tensors: dict[str, torch.Tensor], own: Upload, own_loss: OwnLoss | None,
                            state: dict) -> dict[str, torch.Tensor]:
    """HetLoRA's receive step: the first components of the merged factors, as many as the device's own factor has
    (MLP: ``r_i``; attention: its rank), and the MLP LoRA zero beyond the device's active (pruned) rank.

    Raises:
        ConfigError: if the device pruned its rank but ``own.roles`` does not say which factors are MLP LoRA.
    """
    active = active_rank(state, own.user, own.rank)
    if active < own.rank and not own.roles:
        raise ConfigError(f"device {own.user} pruned its MLP LoRA to rank {active}: HetLoRA's receive step needs "
                          "the roles of its tensors (Upload.roles) to prune the MLP LoRA only")
    out = {}
    for name, t in own.tensors.items():
        merged = global_tensors[name]
        if own.roles.get(name, Role.GENERALIST) in MLP_ROLES:
            merged = fit(merged, rank_shape(name, t.shape, active))
        out[name] = fit(merged, t.shape)
    return out


def hetlora(match: str, reg: float = 5e-3, pruning: float = 0.99) -> Strategy:
    """HetLoRA with the MLP rank matched to CoMiGS's ``full`` or ``active`` experts."""
    return Strategy(f"hetlora-{match}", shape=RankedShape(match), router_mode="fixed",
                    receive_step=truncate_to_active_rank, hooks=RankPruning(reg, pruning))
