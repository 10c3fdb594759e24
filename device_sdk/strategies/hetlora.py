"""HetLoRA (Cho et al., 2023): one LoRA per MLP projection with a rank per device (attention LoRA of the expert rank
on every device); the server zero-pads every device's A and B to the largest rank and averages them weighted by the
norm of each device's update ``||gamma_i B_i A_i||_F`` (sparsity-weighted, each module with its own scale); each
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
from ..inject import adapter_config
from ..parts import Role, role_parameters
from .base import Upload, fit, largest, lora_pairs
from .ranked import RankedLoRA, rank_shape

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


@dataclass
class HetLoRA(RankedLoRA):
    reg: float = 5e-3
    pruning: float = 0.99

    def _active(self, user: int, rank: int) -> int:
        return self.state.setdefault("active_rank", {}).setdefault(str(user), rank)

    def regularizer(self, user: int):
        def reg(model: nn.Module) -> torch.Tensor:
            active = self._active(user, adapter_config(model).rank)  # the MLP LoRA's rank
            keep = math.floor(self.pruning * active)
            return self.reg * tail_norm(model, keep)
        return reg

    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        """Every factor zero-padded to the largest rank, averaged with weights ``||gamma_i B_i A_i||_F`` per module
        (``gamma_i`` the module's own scale on device ``i``, from its rank; float64 sums)."""
        pairs = lora_pairs(uploads[0].tensors)
        merged = {}
        for a_name, b_name in pairs.values():
            norms = [u.scale_of(a_name) * float(torch.linalg.matrix_norm(u.tensors[b_name] @ u.tensors[a_name]))
                     for u in uploads]
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
        """The first components of the merged factors, as many as the device's own factor has (MLP: ``r_i``;
        attention: its rank), and the MLP LoRA zero beyond the device's active (pruned) rank.

        Raises:
            ConfigError: if the device pruned its rank but ``own.roles`` does not say which factors are MLP LoRA.
        """
        active = self._active(own.user, own.rank)
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

    def _tail(self, user: int, model: nn.Module) -> float:
        rank = adapter_config(model).rank  # the MLP LoRA's rank
        with torch.no_grad():
            return float(tail_norm(model, math.floor(self.pruning * self._active(user, rank))))

    def begin_round(self, user: int, model: nn.Module) -> None:
        self.state.setdefault("tail_before", {})[str(user)] = self._tail(user, model)

    def end_round(self, user: int, model: nn.Module) -> None:
        """Prune ``user``'s active MLP rank when its regularised tail shrank during the round (its upload then
        already carries the pruned components, zeroed; the attention LoRA is never pruned)."""
        before = self.state.get("tail_before", {}).get(str(user))
        if before is not None and self._tail(user, model) < before:
            ranks = self.state["active_rank"]
            ranks[str(user)] = max(1, math.floor(self.pruning * ranks[str(user)]))
            keep = ranks[str(user)]
            with torch.no_grad():
                params = role_parameters(model, MLP_ROLES)
                for a_name, b_name in lora_pairs(params).values():
                    params[a_name][keep:].zero_()
                    params[b_name][:, keep:].zero_()


def hetlora(match: str) -> HetLoRA:
    return HetLoRA(f"hetlora-{match}", router_mode="fixed", match=match)
