"""HetLoRA (Cho et al., 2023): one LoRA per projection with a rank per device; the server zero-pads every device's
A and B to the largest rank, averages them weighted by the norm of each device's update (sparsity-weighted), and
sends each device the first ``r_i`` rank components back (truncation).

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

from ..config import AdapterConfig
from ..parts import EXPERT_ROLES, role_parameters
from .base import Strategy, Upload, fit, largest, lora_pairs


def rank_for(n_experts: int, match: str, expert_rank: int = 8) -> int:
    """LoRA rank matching CoMiGS's parameter count (section 4.3.1): ``full`` counts all ``n`` experts of rank 8,
    ``active`` the top-2 that run per token."""
    return expert_rank * (n_experts if match == "full" else min(2, n_experts))


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
class HetLoRA(Strategy):
    match: str = "active"
    reg: float = 5e-3
    pruning: float = 0.99

    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        return AdapterConfig(rank=rank_for(n_experts, self.match, self.rank), n_generalists=1, n_specialists=0)

    def _active(self, user: int, rank: int) -> int:
        return self.state.setdefault("active_rank", {}).setdefault(str(user), rank)

    def regularizer(self, user: int):
        def reg(model: nn.Module) -> torch.Tensor:
            cfg_rank = next(iter(role_parameters(model, EXPERT_ROLES).values())).shape[0]
            active = self._active(user, cfg_rank)
            keep = math.floor(self.pruning * active)
            return self.reg * tail_norm(model, keep)
        return reg

    def aggregate(self, uploads: list[Upload], peer_loss=None):
        names = uploads[0].tensors
        pairs = lora_pairs(names)
        weights = {}
        for module, (a_name, b_name) in pairs.items():  # sparsity-weighted: ||Delta W_i||_F per module
            norms = [u.scale * float(torch.linalg.matrix_norm(u.tensors[b_name] @ u.tensors[a_name])) for u in uploads]
            total = sum(norms)
            weights[module] = [n / total if total > 0 else 1 / len(uploads) for n in norms]
        merged = {}
        for module, (a_name, b_name) in pairs.items():
            for name in (a_name, b_name):
                shape = list(largest(uploads, name).shape)
                acc = torch.zeros(shape, dtype=torch.float64)
                for w, u in zip(weights[module], uploads):
                    acc += w * fit(u.tensors[name], shape).to(torch.float64)
                merged[name] = acc.to(torch.float32)
        out = []
        for u in uploads:
            active = self._active(u.user, u.rank)
            mine = {}
            for name, t in u.tensors.items():
                cut = fit(merged[name], t.shape)
                mine[name] = fit(fit(cut, _rank_shape(name, t.shape, active)), t.shape)  # zero pruned components
            out.append(mine)
        return out

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


def _rank_shape(name: str, shape: torch.Size, rank: int) -> tuple[int, ...]:
    """The shape of a LoRA factor cut to ``rank`` components (A: rows, B: columns)."""
    if name.endswith("lora_A"):
        return (min(rank, shape[0]), shape[1])
    return (shape[0], min(rank, shape[1]))


def hetlora(match: str) -> HetLoRA:
    return HetLoRA(f"hetlora-{match}", router_mode="fixed", match=match)
