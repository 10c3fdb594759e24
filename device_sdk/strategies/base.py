"""The one interface every collaboration strategy has: a device-side policy composed of small parts, and the name
of its server rule.

What a device does is the :class:`Strategy`'s own business: the adapter shape (an :class:`AdapterShape`), how
routers learn (``router_mode``), extra local-training behaviour (:class:`LocalHooks`: HetLoRA's regulariser and
rank pruning) and the receive step (a :data:`Receive`: the global tensors -> what this device loads). What the
server does is named by the strategy's :class:`~device_sdk.federated.StrategySpec` (looked up by name in
:mod:`device_sdk.federated.catalog`): its rule in :data:`device_sdk.federated.RULES`, which roles and tensors
travel, whether ranks differ per device. The aggregator, the in-process simulation (:meth:`Strategy.aggregate`) and
any other engine run the same rule functions, so a simulation through a real server gives bit-identical results.
Strategies hold no model and no data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..config import AdapterConfig
from ..federated import RULES, StrategySpec, Upload, common_start, fit, largest, spec_for  # noqa: F401  (re-exports)
from ..federated.roles import Role
from ..inject import adapter_config
from ..parts import iter_role_parameters, role_parameters, role_state_dict
from ..train import Regularizer

#: ``peer_loss(i, tensors)``: validation loss of user ``i``'s model with ``tensors`` loaded in place of its own
#: shared tensors (PCL needs it; the simulation provides it).
PeerLoss = Callable[[int, dict[str, torch.Tensor]], float]
#: ``own_loss(tensors)``: the receiving device's validation loss with ``tensors`` loaded in place of its own.
OwnLoss = Callable[[dict[str, torch.Tensor]], float]
#: ``receive(global_tensors, own, own_loss, state)``: what the device that uploaded ``own`` loads from the
#: server's global tensors (``state``: the strategy's per-run state, e.g. HetLoRA's active ranks, PCL's trust).
Receive = Callable[[dict[str, torch.Tensor], Upload, "OwnLoss | None", dict], dict[str, torch.Tensor]]


class AdapterShape(Protocol):
    """The adapter layout of a device whose hardware allows ``n_experts`` LoRA modules per MLP projection."""

    def adapter_config(self, n_experts: int, rank: int) -> AdapterConfig: ...


class LocalHooks(Protocol):
    """Extra local-training behaviour (HetLoRA's rank self-pruning)."""

    def regularizer(self, user: int, state: dict) -> Regularizer | None: ...

    def begin_round(self, user: int, model: nn.Module, state: dict) -> None: ...

    def end_round(self, user: int, model: nn.Module, state: dict) -> None: ...


@dataclass(frozen=True)
class GeneralistPlusSpecialists:
    """One generalist and ``n_experts - 1`` specialists of rank ``rank`` (CoMiGS-1GXS; top-2 routing where
    ``n_experts >= 2``)."""

    def adapter_config(self, n_experts: int, rank: int) -> AdapterConfig:
        return AdapterConfig(rank=rank, n_generalists=1, n_specialists=max(0, n_experts - 1))


def keep_global(global_tensors: dict[str, torch.Tensor], own: Upload, own_loss: OwnLoss | None,
                state: dict) -> dict[str, torch.Tensor]:
    """The receive step of mean rules: load the global tensors as they are."""
    return global_tensors


@dataclass
class Strategy:
    """A collaboration strategy: a device-side policy and the name of its server rule.

    Attributes:
        name: the name used on the command line and in result tables.
        shape: the adapter layout per device.
        router_mode: how routers learn (see :data:`device_sdk.config.ROUTER_MODES`).
        freeze_lora_a: FFA-LoRA (A matrices fixed at their common initialisation).
        rank: LoRA rank of one expert (the paper's 8; a device sets the federation's).
        lb_mode: the strategy's load balancing (:data:`device_sdk.config.LB_MODES`).
        receive_step: what a device loads from the server's global tensors.
        hooks: extra local-training behaviour, or ``None``.
        spec: the server side (default: the catalog's entry for ``name``).
        state: what a strategy keeps across rounds of one run (HetLoRA's active ranks, PCL's trust matrices);
            saved with the run's record.
    """

    name: str
    shape: AdapterShape = field(default_factory=GeneralistPlusSpecialists)
    router_mode: str = "validation"
    freeze_lora_a: bool = False
    rank: int = 8
    lb_mode: str = "switch"
    receive_step: Receive = keep_global
    hooks: LocalHooks | None = None
    spec: StrategySpec | None = None
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = spec_for(self.name)

    # --- the server side, by name -----------------------------------------------------------------------------------
    @property
    def server_rule_name(self) -> str:
        """The key of this strategy's server rule in :data:`device_sdk.federated.RULES`."""
        return self.spec.rule

    @property
    def shared_roles(self) -> frozenset[Role]:
        return self.spec.shared_roles

    @property
    def centralized(self) -> bool:
        return self.spec.centralized

    @property
    def collaborative(self) -> bool:
        return self.spec.collaborative

    @property
    def rank_per_device(self) -> bool:
        """True if devices hold LoRA factors of different ranks (HetLoRA, FlexLoRA)."""
        return self.spec.rank_per_device

    @property
    def server_mean(self) -> bool:
        """True if the server rule is the plain mean (the aggregator then streams it, one upload at a time)."""
        return self.spec.plain_mean

    def travels(self, name: str) -> bool:
        """Whether the shared tensor ``name`` is uploaded after each round (FFA-LoRA keeps its fixed A at home)."""
        return self.spec.travels(name)

    def device_shapes(self, shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
        """The shapes a device of LoRA rank ``rank`` holds, given the global (largest) shapes."""
        return self.spec.device_shapes(shapes, rank)

    # --- per user ---------------------------------------------------------------------------------------------------
    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        """The adapter shape of ``user``, whose hardware allows ``n_experts`` LoRA modules per MLP projection."""
        return self.shape.adapter_config(n_experts, self.rank)

    def train_overrides(self) -> dict:
        """TrainConfig fields this strategy fixes (``router_mode``, ``freeze_lora_a``, ``lb_mode``; no load
        balancing without a learned router)."""
        overrides = {"router_mode": self.router_mode, "freeze_lora_a": self.freeze_lora_a, "lb_mode": self.lb_mode}
        if self.router_mode == "fixed":
            overrides["lb_weight"] = 0.0
        return overrides

    def regularizer(self, user: int) -> Regularizer | None:
        """An extra loss term for ``user``'s local training (HetLoRA), or ``None``."""
        return None if self.hooks is None else self.hooks.regularizer(user, self.state)

    def begin_round(self, user: int, model: nn.Module) -> None:
        """Called before ``user``'s local training in each round."""
        if self.hooks is not None:
            self.hooks.begin_round(user, model, self.state)

    def end_round(self, user: int, model: nn.Module) -> None:
        """Called after ``user``'s local training in each round, before its upload."""
        if self.hooks is not None:
            self.hooks.end_round(user, model, self.state)

    def prepare(self, user: int, model: nn.Module) -> None:
        """Adjust a freshly injected model (e.g. zero routers so that fixed gates are uniform)."""
        if self.router_mode == "fixed":
            with torch.no_grad():
                for p in role_parameters(model, Role.ROUTER).values():
                    p.zero_()

    def initial_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that must agree across devices before round 1 (copies)."""
        return role_state_dict(model, self.shared_roles) if self.shared_roles else {}

    def shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this device uploads after a round (copies)."""
        return {k: v for k, v in self.initial_tensors(model).items() if self.travels(k)}

    # --- thin delegates to the federated rules ------------------------------------------------------------------------
    def initial(self, uploads: list[Upload]) -> list[dict[str, torch.Tensor]]:
        """:func:`device_sdk.federated.common_start`: common values before round 1."""
        return common_start(uploads)

    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        """The global tensors the server computes from one round's uploads (in device order):
        ``RULES[self.server_rule_name](uploads)``."""
        return RULES[self.server_rule_name](uploads)

    def receive(self, global_tensors: dict[str, torch.Tensor], own: Upload,
                own_loss: OwnLoss | None = None) -> dict[str, torch.Tensor]:
        """What the device that uploaded ``own`` loads from the server's global tensors.

        Args:
            own_loss: the device's validation loss with other shared tensors loaded (PCL scores peers with it).
        """
        return self.receive_step(global_tensors, own, own_loss, self.state)

    # --- both, in one process (the simulation) ----------------------------------------------------------------------
    def aggregate(self, uploads: list[Upload], peer_loss: PeerLoss | None = None) -> list[dict[str, torch.Tensor]]:
        """What each uploading device loads next round, in the order of ``uploads``: :meth:`server_rule` then
        every device's :meth:`receive`."""
        merged = self.server_rule(uploads)
        return self.receive_all([merged] * len(uploads), uploads, peer_loss)

    def receive_all(self, globals_: list[dict[str, torch.Tensor]], uploads: list[Upload],
                    peer_loss: PeerLoss | None = None) -> list[dict[str, torch.Tensor]]:
        """:meth:`receive` for every device (``globals_[i]``: what device ``i`` downloaded)."""
        out = []
        for merged, u in zip(globals_, uploads):
            out.append(dict(self.receive(merged, u, own_loss_of(peer_loss, u.user))))
        return out


def own_loss_of(peer_loss: PeerLoss | None, user: int) -> OwnLoss | None:
    """``peer_loss`` bound to ``user`` (``None`` stays ``None``)."""
    return None if peer_loss is None else (lambda tensors: peer_loss(user, tensors))


def device_upload(user: int, model: nn.Module, tensors: dict[str, torch.Tensor], tokens: int = 0) -> Upload:
    """``tensors`` (taken from ``model``) as user ``user``'s :class:`Upload`: the model's expert rank and alpha and
    every tensor's role (what a strategy's receive step reads on the device)."""
    cfg = adapter_config(model)
    roles = {name: role for name, _, role in iter_role_parameters(model) if name in tensors}
    return Upload(user, tensors, tokens, cfg.rank, cfg.alpha, roles)
