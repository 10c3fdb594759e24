"""HetLoRA (Cho et al., 2023): one LoRA per projection with a rank per device; the server zero-pads every device's
A and B to the largest rank and averages them weighted by the norm of each device's update (sparsity-weighted);
each device keeps the first ``r_i`` rank components of the result (truncation), zero beyond its active rank.

Local training adds the rank self-pruning regulariser ``lambda * sum ||gamma B[:, p:] A[p:, :]||_F`` over the
rank components beyond ``p = floor(pruning * r)``; when that tail shrank over a round, the device's active rank
drops to ``p`` (pruned components are zeroed and stay zero). Appendix C.3: pruning strength 0.99, lambda swept in
{5e-2, 5e-3, 5e-4}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..parts import EXPERT_ROLES, role_parameters
from .base import Upload, fit, largest, lora_pairs
from .ranked import RankedLoRA, rank_shape


def tail_norm(model: nn.Module, keep: int) -> torch.Tensor:
    """``sum over LoRA modules of ||B[:, keep:] @ A[keep:, :]||_F``, through ``tr((B^T B)(A A^T))``."""
    params = role_parameters(model, EXPERT_ROLES)
    total = torch.zeros(())
    for a_name, b_name in lora_pairs(params).values():
        a, b = params[a_name][keep:], params[b_name][:, keep:]
        if a.shape[0] == 0:
            continue
        gram = (b.t() @ b) * (a @ a.t())  # (tail, tail)
        total = total + gram.sum().clamp_min(0).add(1e-12).sqrt()
    return total


@dataclass
class HetLoRA(RankedLoRA):
    reg: float = 5e-3
    pruning: float = 0.99

    def _active(self, user: int, rank: int) -> int:
        return self.state.setdefault("active_rank", {}).setdefault(str(user), rank)

    def regularizer(self, user: int):
        def reg(model: nn.Module) -> torch.Tensor:
            cfg_rank = next(iter(role_parameters(model, EXPERT_ROLES).values())).shape[0]
            active = self._active(user, cfg_rank)
            keep = math.floor(self.pruning * active)
            return self.reg * tail_norm(model, keep)
        return reg

    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        """Every factor zero-padded to the largest rank, averaged with weights ``||gamma_i B_i A_i||_F`` per module
        (float64 sums)."""
        pairs = lora_pairs(uploads[0].tensors)
        merged = {}
        for a_name, b_name in pairs.values():
            norms = [u.scale * float(torch.linalg.matrix_norm(u.tensors[b_name] @ u.tensors[a_name])) for u in uploads]
            total = sum(norms)
            weights = [n / total if total > 0 else 1 / len(uploads) for n in norms]
            for name in (a_name, b_name):
                shape = list(largest(uploads, name).shape)
                acc = torch.zeros(shape, dtype=torch.float64)
                for w, u in zip(weights, uploads):
                    acc += w * fit(u.tensors[name], shape).to(torch.float64)
                merged[name] = acc.to(torch.float32)
        return merged

    def receive(self, global_tensors, own, own_loss=None):
        """The first ``r_i`` components of the merged factors, zero beyond the device's active (pruned) rank."""
        active = self._active(own.user, own.rank)
        return {name: fit(fit(global_tensors[name], rank_shape(name, t.shape, active)), t.shape)
                for name, t in own.tensors.items()}

    def _tail(self, user: int, model: nn.Module) -> float:
        rank = next(iter(role_parameters(model, EXPERT_ROLES).values())).shape[0]
        with torch.no_grad():
            return float(tail_norm(model, math.floor(self.pruning * self._active(user, rank))))

    def begin_round(self, user: int, model: nn.Module) -> None:
        self.state.setdefault("tail_before", {})[str(user)] = self._tail(user, model)

    def end_round(self, user: int, model: nn.Module) -> None:
        """Prune ``user``'s active rank when its regularised tail shrank during the round (its upload then
        already carries the pruned components, zeroed)."""
        before = self.state.get("tail_before", {}).get(str(user))
        if before is not None and self._tail(user, model) < before:
            ranks = self.state["active_rank"]
            ranks[str(user)] = max(1, math.floor(self.pruning * ranks[str(user)]))
            keep = ranks[str(user)]
            with torch.no_grad():
                params = role_parameters(model, EXPERT_ROLES)
                for a_name, b_name in lora_pairs(params).values():
                    params[a_name][keep:].zero_()
                    params[b_name][:, keep:].zero_()


def hetlora(match: str) -> HetLoRA:
    return HetLoRA(f"hetlora-{match}", router_mode="fixed", match=match)
