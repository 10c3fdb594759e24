"""LoRA and LoRA-MoE layers. They wrap a frozen base layer and add low-rank updates; nothing is rebuilt.

Shapes: ``B`` batch, ``T`` tokens, ``N = B*T``, ``D_in``/``D_out`` the base layer's features, ``r`` the rank,
``E`` the number of experts of a mixture, ``k`` experts mixed per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import InjectionError
from .parts import Role


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer; the one dispatch point over layer types.

    Raises:
        InjectionError: for layer types other than ``nn.Linear`` and GPT-2's ``Conv1D``.
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):  # weight is (D_in, D_out)
        return base.weight.shape[0], base.weight.shape[1]
    raise InjectionError(
        f"cannot attach LoRA to a {type(base).__name__}: supported base layers are torch.nn.Linear and "
        "transformers' Conv1D. Choose other target modules."
    )


#: Token counts routed to an expert are padded to a multiple of this in sparse mode.
SPARSE_BUCKET = 64


class LoRAExpert(nn.Module):
    """One low-rank update ``x -> B(A(x))`` (unscaled). ``role`` says who owns it.

    Parameters follow PEFT's layout: ``lora_A`` is ``(r, D_in)`` (Kaiming-uniform), ``lora_B`` is ``(D_out, r)``
    (zeros, so a fresh adapter leaves the base model unchanged).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, role: Role) -> None:
        super().__init__()
        self.role = role
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D_in) -> (..., D_out)."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRALinear(nn.Module):
    """A frozen base layer plus one LoRA: ``y = base(x) + gamma * B(A(x))``."""

    def __init__(self, base: nn.Module, rank: int, scale: float, role: Role = Role.ATTENTION) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base = base
        self.scale = scale
        self.lora = LoRAExpert(d_in, d_out, rank, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D_in) -> (B, T, D_out)."""
        return self.base(x) + self.scale * self.lora(x)


class Router(nn.Module):
    """Token router of one MLP block: a linear map of the block input to expert logits (no bias)."""

    def __init__(self, d_model: int, n_experts: int, init_std: float) -> None:
        super().__init__()
        self.role = Role.ROUTER
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> logits (B, T, E)."""
        return F.linear(x, self.weight)


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the k largest logits per token and softmax over them (the paper's gating).

    Args:
        logits: (..., E) router logits.
        k: experts per token, ``1 <= k <= E``.

    Returns:
        ``(gates, indices)``: ``gates`` (..., E) dense, zero outside the selected experts and summing to 1;
        ``indices`` (..., k) the selected experts, largest logit first.
    """
    top_values, indices = logits.topk(k, dim=-1)
    weights = top_values.float().softmax(dim=-1)
    gates = torch.zeros(logits.shape, dtype=weights.dtype, device=logits.device).scatter(-1, indices, weights)
    return gates, indices


def dense_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The gates of :func:`top_k_gates` alone: (..., E) -> (..., E), zero outside the top k.

    With ``k == E`` they are a plain softmax, computed as one: no top-k, scatter or gather in an exported graph,
    whose partitioner (XNNPACK) delegates softmax but not those.
    """
    if k == logits.shape[-1]:
        return logits.float().softmax(dim=-1)
    return top_k_gates(logits, k)[0]


def constant_weight(value: torch.Tensor) -> nn.Parameter:
    """A constant used as the weight of ``F.linear`` in an exported graph: a frozen parameter without role (part of
    the base). Not a buffer: XNNPACK (executorch 1.x) computes a linear whose weight is a buffer wrongly (errors of
    order 1 against eager), while a parameter weight is exact and delegated whole."""
    return nn.Parameter(value, requires_grad=False)


def fixed_gates(logits: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token on one expert with gate 1 (see :func:`device_sdk.inject.forced_expert`).

    Args:
        logits: (..., E) router logits (only their shape, dtype and device are read).
        expert: the expert every token goes to, ``0 <= expert < E``.

    Returns:
        ``(gates, indices)`` as from :func:`top_k_gates` with k = 1: ``gates`` (..., E) one-hot, ``indices`` (..., 1).
    """
    indices = torch.full((*logits.shape[:-1], 1), expert, dtype=torch.long, device=logits.device)
    gates = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter(-1, indices, 1.0)
    return gates, indices


@dataclass
class Routing:
    """What a routed MLP block decided for the tokens of the current forward pass.

    Attributes:
        gates: (B, T, E) dense gate weights.
        indices: (B, T, k) selected experts; ``None`` in the export form, where every expert runs on every token
            weighted by its gate.
        columns: the export form's gates, one (B, T, 1) tensor per expert.
    """

    gates: torch.Tensor
    indices: torch.Tensor | None
    columns: list[torch.Tensor] | None = None


class RoutingSlot:
    """A mutable holder shared by a :class:`RoutedMLP` and its :class:`LoRAMoELinear` projections.

    The block writes the routing before calling its MLP and clears it afterwards; a projection used outside its
    block raises instead of silently reusing stale gates.
    """

    def __init__(self) -> None:
        self.routing: Routing | None = None


class LoRAMoELinear(nn.Module):
    """A frozen base layer plus a mixture of LoRA experts: ``y = base(x) + gamma * sum_e g_e(x) B_e(A_e(x))``.

    Experts are ordered generalists first, then specialists. The gates come from the enclosing block's router
    through ``slot``. Dense mode computes all experts as one concatenated rank-``E*r`` LoRA with the gates applied
    on the low-rank activations; sparse mode runs each expert only on the tokens routed to it; the export form
    (routing without indices) runs each expert's own A and B on every token and weights it by its gate.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        scale: float,
        n_generalists: int,
        n_specialists: int,
        slot: RoutingSlot,
        sparse: bool,
    ) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base = base
        self.scale = scale
        self.rank = rank
        self.sparse = sparse
        self._slot = slot
        roles = [Role.GENERALIST] * n_generalists + [Role.SPECIALIST] * n_specialists
        self.experts = nn.ModuleList(LoRAExpert(d_in, d_out, rank, role) for role in roles)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def lora_a_cat(self) -> torch.Tensor:
        """Every expert's ``A_e`` stacked: (E*r, D_in), rows ``e*r .. (e+1)*r - 1`` expert ``e``'s."""
        return torch.cat([e.lora_A for e in self.experts], dim=0)

    def low_rank_in(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's ``A_e x``: (..., D_in) -> (..., E, r)."""
        return F.linear(x, self.lora_a_cat()).unflatten(-1, (self.n_experts, self.rank))

    def lora_b_cat(self) -> torch.Tensor:
        """Every expert's ``B_e`` side by side: (D_out, E*r), columns ``e*r .. (e+1)*r - 1`` expert ``e``'s."""
        return torch.cat([e.lora_B for e in self.experts], dim=1)

    def low_rank_out(self, h: torch.Tensor) -> torch.Tensor:
        """``sum_e B_e h_e`` (unscaled): (..., E, r) -> (..., D_out)."""
        return F.linear(h.flatten(-2), self.lora_b_cat())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D_in) -> (B, T, D_out)."""
        out = self.base(x)
        if self.n_experts == 1:
            return out + self.scale * self.experts[0](x)
        routing = self._slot.routing
        if routing is None:
            raise RuntimeError("LoRAMoELinear called outside its RoutedMLP block: no routing available")
        if routing.columns is not None:
            return out + self.scale * self._per_expert_update(x, routing.columns)
        if self.sparse:
            return out + self.scale * self._sparse_update(x, routing)
        return out + self.scale * self._dense_update(x, routing.gates)

    def _per_expert_update(self, x: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
        """Export form: ``sum_e g_e B_e(A_e x)`` with each expert's own weights (one data-file key each), from ops
        XNNPACK delegates. (B, T, D_in) and E gates (B, T, 1) -> (B, T, D_out)."""
        out = None
        for expert, gate in zip(self.experts, columns):
            y = expert(x) * gate.to(x.dtype)
            out = y if out is None else out + y
        return out

    def _dense_update(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        h = self.low_rank_in(x)  # (B, T, E, r)
        return self.low_rank_out(h * gates.to(h.dtype).unsqueeze(-1))  # (B, T, D_out)

    def _sparse_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])  # (N, D_in)
        flat_idx = routing.indices.reshape(-1, routing.indices.shape[-1])  # (N, k)
        flat_gates = routing.gates.reshape(-1, routing.gates.shape[-1])  # (N, E)
        update = torch.zeros(flat_x.shape[0], self.experts[0].lora_B.shape[0], dtype=x.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            tokens = (flat_idx == e).any(dim=-1).nonzero().squeeze(-1)  # (N_e,)
            if tokens.numel() == 0:
                continue
            weight = flat_gates.index_select(0, tokens)[:, e : e + 1]  # (N_e, 1)
            # Pad N_e up to a multiple of SPARSE_BUCKET with zero-weight copies of token 0: a handful of distinct
            # matmul shapes instead of a new one per call (CPU kernels are specialised and cached per shape).
            pad = -tokens.numel() % SPARSE_BUCKET
            if pad:
                tokens = torch.cat([tokens, tokens.new_zeros(pad)])
                weight = torch.cat([weight, weight.new_zeros(pad, 1)])
            y = expert(flat_x.index_select(0, tokens)) * weight.to(x.dtype)  # (N_e + pad, D_out)
            update = update.index_add(0, tokens, y.to(update.dtype))
        return update.reshape(*x.shape[:-1], update.shape[-1])


class RoutedMLP(nn.Module):
    """Wraps an MLP block and routes each token to its top-k experts with the block's router.

    Two forms (``AdapterConfig.mixing``): with ``experts`` (a :class:`device_sdk.mixture.ExpertMLPs`) every expert
    is the whole MLP with its own LoRAs and the block mixes the experts' outputs (``mlp``, the paper's model);
    without it the wrapped MLP runs once and each of its :class:`LoRAMoELinear` projections mixes the experts'
    low-rank updates with the gates (``projection``).

    After each forward it keeps, for the losses and for routing analysis:
    ``router_probs`` (N, E) full softmax of the logits and ``gates`` (N, E) top-k gates.
    """

    def __init__(self, mlp: nn.Module, d_model: int, n_experts: int, k: int, router_init_std: float,
                 slot: RoutingSlot, experts=None) -> None:
        super().__init__()
        self.mlp = mlp
        self.k = k
        self.n_experts = n_experts
        self._slot = slot
        self._experts = experts
        self.router = Router(d_model, n_experts, router_init_std) if n_experts > 1 else None
        self.router_probs: torch.Tensor | None = None
        self.gates: torch.Tensor | None = None
        #: ``None``: the router chooses; an expert index: every token goes to that expert with gate 1 (set it with
        #: :func:`device_sdk.inject.forced_expert`).
        self.forced_expert: int | None = None
        self.export_form = False  # see use_export_form

    def use_export_form(self) -> None:
        """Compute the same function (to float tolerance) from ops an exported graph delegates as a whole (XNNPACK):
        every expert on every token weighted by its dense gate (no top-k when k = E, no gather, scatter or masks),
        each gate column taken by a product with a constant one-hot row (XNNPACK delegates a linear on a dynamic
        number of tokens, not a slice)."""
        if self.router is not None and not self.export_form:
            for e, row in enumerate(torch.eye(self.n_experts, device=self.router.weight.device)):
                setattr(self, f"gate_row_{e}", constant_weight(row[None]))  # (1, E)
        self.export_form = True

    def _gate_columns(self, gates: torch.Tensor) -> list[torch.Tensor]:
        """E (B, T, 1) columns of (B, T, E) dense gates (export form)."""
        return [F.linear(gates, getattr(self, f"gate_row_{e}")) for e in range(self.n_experts)]

    @property
    def mixing(self) -> str:
        return "projection" if self._experts is None else "mlp"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        if self.router is None:
            return self.mlp(x, *args, **kwargs)
        logits = self.router(x)  # (B, T, E)
        if self.forced_expert is not None:
            gates, indices = fixed_gates(logits, self.forced_expert)
        elif self.export_form:
            gates, indices = dense_gates(logits, self.k), None
        else:
            gates, indices = top_k_gates(logits, self.k)
        self.router_probs = logits.float().softmax(dim=-1).reshape(-1, self.n_experts)
        self.gates = gates.reshape(-1, self.n_experts)
        columns = None if indices is not None else self._gate_columns(gates)
        if self._experts is not None:
            if columns is not None:
                return self._experts.every_expert(x, columns)
            return self._experts(x, gates.gather(-1, indices), indices)
        self._slot.routing = Routing(gates=gates, indices=indices, columns=columns)
        try:
            return self.mlp(x, *args, **kwargs)
        finally:
            self._slot.routing = None


def routed_blocks(model: nn.Module) -> list[RoutedMLP]:
    """The model's routed MLP blocks, in layer order."""
    return [m for m in model.modules() if isinstance(m, RoutedMLP)]
