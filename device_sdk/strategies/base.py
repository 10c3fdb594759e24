"""The one interface every collaboration strategy implements, and the tensor helpers they share.

A strategy decides, per user: the adapter shape (experts, rank), how routers learn (``router_mode``), which LoRA
tensors leave the device, and how a server turns the uploaded tensors into what each device loads next round
(:meth:`Strategy.aggregate`, a pure function of tensors: the in-process simulation and a networked aggregator call
the same code). Strategies hold no model and no data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..parts import SHARED_ROLES, Role, role_parameters, role_state_dict
from ..train import Regularizer

#: ``peer_loss(i, tensors)``: validation loss of user ``i``'s model with ``tensors`` loaded in place of its own
#: shared tensors (PCL needs it; the simulation provides it).
PeerLoss = Callable[[int, dict[str, torch.Tensor]], float]


@dataclass
class Upload:
    """What one device sends after local training.

    Attributes:
        user: the device's index in the federation (0..n-1).
        tensors: ``{name: tensor}`` of the shared adapter tensors.
        tokens: training tokens seen this round (for token-weighted rules).
        rank: the device's LoRA rank.
        scale: the device's LoRA scale gamma.
    """

    user: int
    tensors: dict[str, torch.Tensor]
    tokens: int
    rank: int
    scale: float


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
        state: what a strategy keeps across rounds of one run (HetLoRA's active ranks, PCL's trust matrices);
            saved with the run's record.
    """

    name: str
    router_mode: str = "validation"
    shared_roles: frozenset[Role] = SHARED_ROLES
    freeze_lora_a: bool = False
    centralized: bool = False
    rank: int = 8
    state: dict = field(default_factory=dict)  # per-run mutable state (e.g. HetLoRA's pruned ranks, PCL's trust)

    # --- per user -------------------------------------------------------------------------------------------------
    def adapter_config(self, user: int, n_experts: int) -> AdapterConfig:
        """The adapter shape of ``user``, whose hardware allows ``n_experts`` LoRA modules per MLP projection."""
        return AdapterConfig(rank=self.rank, n_generalists=1, n_specialists=max(0, n_experts - 1))

    def train_overrides(self) -> dict:
        """TrainConfig fields this strategy fixes (``router_mode``, ``freeze_lora_a``; no load balancing without
        a learned router)."""
        overrides = {"router_mode": self.router_mode, "freeze_lora_a": self.freeze_lora_a}
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

    def shared_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this device uploads after a round (copies)."""
        return self.initial_tensors(model)

    # --- server side ----------------------------------------------------------------------------------------------
    @property
    def collaborative(self) -> bool:
        return bool(self.shared_roles) and not self.centralized

    @property
    def server_mean(self) -> bool:
        """True if the server rule is the plain mean, which the networked aggregator runs (streaming)."""
        return type(self).aggregate is Strategy.aggregate

    def initial(self, uploads: list[Upload]) -> list[dict[str, torch.Tensor]]:
        """Common starting values: every device gets, per name, the largest initial tensor cut to its own shape
        (identical shapes: user 0's values), so that shared tensors (and FFA's frozen A) agree before round 1."""
        return [{name: fit(largest(uploads, name), t.shape) for name, t in u.tensors.items()} for u in uploads]

    def aggregate(self, uploads: list[Upload], peer_loss: PeerLoss | None = None) -> list[dict[str, torch.Tensor]]:
        """What each uploading device loads next round, in the order of ``uploads``. Default: the uniform mean
        (the paper's FedAvg rule), the same for every device."""
        mean = mean_tensors([u.tensors for u in uploads])
        return [dict(mean) for _ in uploads]


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


def lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """``{module: (A name, B name)}`` for every LoRA module in a tensor dict (names ending in lora_A / lora_B)."""
    pairs = {}
    for name in tensors:
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            if module + ".lora_B" in tensors:
                pairs[module] = (name, module + ".lora_B")
    return pairs
