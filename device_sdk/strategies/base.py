"""The one interface every collaboration strategy implements, and the tensor helpers they share.

A strategy decides, per user: the adapter shape (experts, rank), how routers learn (``router_mode``), which LoRA
tensors leave the device, and how the uploaded tensors become what each device loads next round. That last part
has two halves, both pure functions of tensors:

- :meth:`Strategy.server_rule` runs on the server: one round's uploads -> one global tensor dict (the mean; HetLoRA's
  padded sparsity-weighted mean; FlexLoRA's SVD of the mean update; PCL's bundle of every upload);
- :meth:`Strategy.receive` runs on each device: the global dict -> what this device loads (the identity; a cut to
  the device's rank; PCL's trust-weighted mix, scored on the device's own validation data).

The networked aggregator (``aggregator.service``) and the in-process simulation (:meth:`Strategy.aggregate`) call
the same two functions, so a simulation through a real server gives bit-identical results. Strategies hold no model
and no data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig, lora_scale
from ..errors import ConfigError
from ..inject import adapter_config
from ..parts import SHARED_ROLES, Role, iter_role_parameters, role_parameters, role_state_dict
from ..train import Regularizer

#: ``peer_loss(i, tensors)``: validation loss of user ``i``'s model with ``tensors`` loaded in place of its own
#: shared tensors (PCL needs it; the simulation provides it).
PeerLoss = Callable[[int, dict[str, torch.Tensor]], float]
#: ``own_loss(tensors)``: the receiving device's validation loss with ``tensors`` loaded in place of its own.
OwnLoss = Callable[[dict[str, torch.Tensor]], float]


@dataclass
class Upload:
    """What one device sends after local training.

    Attributes:
        user: the device's index in the federation (0..n-1).
        tensors: ``{name: tensor}`` of the shared adapter tensors.
        tokens: training tokens seen this round (for token-weighted rules).
        rank: the device's LoRA rank of one MLP expert (HetLoRA / FlexLoRA: its budget's rank; the attention
            LoRA may have another, read from its tensors).
        alpha: the device's LoRA alpha; every LoRA module's scale follows from it and the module's own rank
            (:meth:`scale_of`).
        roles: ``{name: role}`` of ``tensors`` where the uploader knows them (a device does; a server, which sees
            names only, leaves it empty).
    """

    user: int
    tensors: dict[str, torch.Tensor]
    tokens: int
    rank: int
    alpha: float
    roles: dict[str, Role] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The LoRA scale gamma of the device's MLP experts, ``alpha / sqrt(rank)`` (paper eq. 4)."""
        return lora_scale(self.alpha, self.rank)

    def scale_of(self, name: str) -> float:
        """The LoRA scale gamma of the module that factor ``name`` belongs to: ``alpha / sqrt(r)`` with ``r`` its
        own rank, read from the factor's shape (``lora_A`` (r, D_in): rows; ``lora_B`` (D_out, r): columns)."""
        return lora_scale(self.alpha, factor_rank(name, self.tensors[name]))


@dataclass
class Strategy:
    """A collaboration strategy; subclasses override what differs.

    Attributes:
        name: the name used on the command line and in result tables.
        router_mode: how routers learn (see :data:`device_sdk.config.ROUTER_MODES`).
        shared_roles: adapter roles uploaded to the server (empty: nothing leaves the device).
        freeze_lora_a: FFA-LoRA (A matrices fixed at their common initialisation).
        centralized: one model trained on all users' data (an upper bound, not a federation).
        rank: LoRA rank of one expert (the paper's 8).
        lb_mode: the strategy's load balancing (:data:`device_sdk.config.LB_MODES`).
        state: what a strategy keeps across rounds of one run (HetLoRA's active ranks, PCL's trust matrices);
            saved with the run's record.
    """

    name: str
    router_mode: str = "validation"
    shared_roles: frozenset[Role] = SHARED_ROLES
    freeze_lora_a: bool = False
    centralized: bool = False
    rank: int = 8
    lb_mode: str = "switch"
    state: dict = field(default_factory=dict)  # per-run mutable state (e.g. HetLoRA's pruned ranks, PCL's trust)

    # --- per user -------------------------------------------------------------------------------------------------
    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        """The adapter shape of ``user``, whose hardware allows ``n_experts`` LoRA modules per MLP projection."""
        return AdapterConfig(rank=self.rank, n_generalists=1, n_specialists=max(0, n_experts - 1))

    def train_overrides(self) -> dict:
        """TrainConfig fields this strategy fixes (``router_mode``, ``freeze_lora_a``, ``lb_mode``; no load
        balancing without a learned router)."""
        overrides = {"router_mode": self.router_mode, "freeze_lora_a": self.freeze_lora_a, "lb_mode": self.lb_mode}
        if self.router_mode == "fixed":
            overrides["lb_weight"] = 0.0
        return overrides

    def regularizer(self, user: int) -> Regularizer | None:
        """An extra loss term for ``user``'s local training (HetLoRA), or ``None``."""
        return None

    def begin_round(self, user: int, model: nn.Module) -> None:
        """Called before ``user``'s local training in each round."""

    def end_round(self, user: int, model: nn.Module) -> None:
        """Called after ``user``'s local training in each round, before its upload."""

    def prepare(self, user: int, model: nn.Module) -> None:
        """Adjust a freshly injected model (e.g. zero routers so that fixed gates are uniform)."""
        if self.router_mode == "fixed":
            with torch.no_grad():
                for p in role_parameters(model, Role.ROUTER).values():
                    p.zero_()

    def initial_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that must agree across devices before round 1 (copies)."""
        return role_state_dict(model, self.shared_roles) if self.shared_roles else {}

    def travels(self, name: str) -> bool:
        """Whether the shared tensor ``name`` is uploaded after each round (FFA-LoRA keeps its fixed A at home)."""
        return True

    def shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this device uploads after a round (copies)."""
        return {k: v for k, v in self.initial_tensors(model).items() if self.travels(k)}

    @property
    def collaborative(self) -> bool:
        return bool(self.shared_roles) and not self.centralized

    @property
    def rank_per_device(self) -> bool:
        """True if devices hold LoRA factors of different ranks (HetLoRA, FlexLoRA): shared tensors then agree in
        name but not in shape, and a server checks each upload against the global shapes cut to the device's rank."""
        return False

    def device_shapes(self, shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
        """The shapes a device of LoRA rank ``rank`` uploads, given the global (largest) shapes."""
        return dict(shapes)

    # --- server side ----------------------------------------------------------------------------------------------
    @property
    def server_mean(self) -> bool:
        """True if the server rule is the plain mean (the aggregator then streams it, one upload at a time)."""
        return type(self).server_rule is Strategy.server_rule

    def initial(self, uploads: list[Upload]) -> list[dict[str, torch.Tensor]]:
        """Common starting values: every device gets, per name, the largest initial tensor cut to its own shape
        (identical shapes: user 0's values), so that shared tensors (and FFA's frozen A) agree before round 1."""
        return [{name: fit(largest(uploads, name), t.shape) for name, t in u.tensors.items()} for u in uploads]

    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        """The global tensors the server computes from one round's uploads (in device order). Default: the uniform
        mean (the paper's FedAvg rule)."""
        return mean_tensors([u.tensors for u in uploads])

    # --- device side ----------------------------------------------------------------------------------------------
    def receive(self, global_tensors: dict[str, torch.Tensor], own: Upload,
                own_loss: OwnLoss | None = None) -> dict[str, torch.Tensor]:
        """What the device that uploaded ``own`` loads from the server's global tensors. Default: all of them.

        Args:
            own_loss: the device's validation loss with other shared tensors loaded (PCL scores peers with it).
        """
        return global_tensors

    # --- both, in one process (the simulation) --------------------------------------------------------------------
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
            own_loss = None if peer_loss is None else (lambda tensors, user=u.user: peer_loss(user, tensors))
            out.append(dict(self.receive(merged, u, own_loss)))
        return out


def device_upload(user: int, model: nn.Module, tensors: dict[str, torch.Tensor], tokens: int = 0) -> Upload:
    """``tensors`` (taken from ``model``) as user ``user``'s :class:`Upload`: the model's expert rank and alpha and
    every tensor's role (what a strategy's receive step reads on the device)."""
    cfg = adapter_config(model)
    roles = {name: role for name, _, role in iter_role_parameters(model) if name in tensors}
    return Upload(user, tensors, tokens, cfg.rank, cfg.alpha, roles)


def largest(uploads: list[Upload], name: str) -> torch.Tensor:
    """The upload's tensor ``name`` with the most elements (the highest rank)."""
    return max((u.tensors[name] for u in uploads if name in u.tensors), key=lambda t: t.numel())


def mean_tensors(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of equally keyed and shaped tensor dicts (accumulated in float64).

    Raises:
        ConfigError: if there is nothing to average or the dicts disagree on keys or shapes.
    """
    if not dicts:
        raise ConfigError("nothing to aggregate: no uploads")
    keys = set(dicts[0])
    for d in dicts[1:]:
        if set(d) != keys:
            raise ConfigError(f"uploads disagree on tensor names: {sorted(keys ^ set(d))[:3]}")
    out = {}
    for name in dicts[0]:
        shapes = {tuple(d[name].shape) for d in dicts}
        if len(shapes) != 1:
            raise ConfigError(f"uploads disagree on the shape of {name}: {sorted(shapes)}")
        # the same arithmetic as the aggregator's streaming mean (float64 sum, one division), so a simulation
        # through the server gives bit-identical results
        acc = torch.zeros(dicts[0][name].shape, dtype=torch.float64)
        for d in dicts:
            acc.add_(d[name])
        out[name] = (acc / len(dicts)).to(dicts[0][name].dtype)
    return out


def fit(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Zero-pad or truncate ``tensor`` to ``shape`` (from the start of every dimension).

    Used for LoRA factors of different ranks: ``A`` is ``(r, D_in)``, ``B`` is ``(D_out, r)``; the first ``r``
    rank components are kept, missing ones are zero (HetLoRA's padding and truncation).
    """
    out = torch.zeros(shape, dtype=tensor.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, shape))
    out[region] = tensor[region]
    return out


def factor_rank(name: str, tensor: torch.Tensor) -> int:
    """The rank of LoRA factor ``name``: rows of a ``lora_A`` (r, D_in), columns of a ``lora_B`` (D_out, r).

    Raises:
        ConfigError: for a name that is not a LoRA factor.
    """
    if name.endswith("lora_A"):
        return tensor.shape[0]
    if name.endswith("lora_B"):
        return tensor.shape[-1]
    raise ConfigError(f"{name} is not a LoRA factor (a name ending in lora_A or lora_B); it has no rank")


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """``{module: (A name, B name)}`` for every LoRA module in a tensor dict (names ending in lora_A / lora_B)."""
    pairs = {}
    for name in tensors:
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            if module + ".lora_B" in tensors:
                pairs[module] = (name, module + ".lora_B")
    return pairs
