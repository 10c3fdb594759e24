"""Every strategy by name as a server (or any other engine) sees it: which rule it runs, which roles and tensors
travel, whether devices hold different ranks. No model code: the device side of each strategy (adapter shape,
router training, receive step) lives in :mod:`device_sdk.strategies`, which reads its server side from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .roles import NO_ROLES, SHARED_ROLES, Role
from .rules import RULES, TOKEN_RULES
from .tensors import rank_shape

#: Which of a strategy's shared tensors travel after each round: all, or only the B factors (FFA-LoRA keeps its
#: fixed A at home).
TRAVELLING = ("all", "lora_B")


@dataclass(frozen=True)
class StrategySpec:
    """The server side of one strategy.

    Attributes:
        name: the strategy's name (command line, federation config, result tables).
        rule: its server rule, a key of :data:`device_sdk.federated.rules.RULES`.
        shared_roles: adapter roles that leave a device (empty: nothing does).
        travelling: which shared tensors are uploaded each round (:data:`TRAVELLING`).
        rank_per_device: devices hold LoRA factors of different ranks (HetLoRA, FlexLoRA): shared tensors agree in
            name but not in shape, and a server checks each upload against the global shapes cut to its rank.
        centralized: one model trained on all users' data (an upper bound for the simulation, not a federation).
    """

    name: str
    rule: str = "mean"
    shared_roles: frozenset[Role] = SHARED_ROLES
    travelling: str = "all"
    rank_per_device: bool = False
    centralized: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.rule not in RULES:
            problems.append(f"rule {self.rule!r} is not one of {sorted(RULES)}")
        if self.travelling not in TRAVELLING:
            problems.append(f"travelling {self.travelling!r} is not one of {TRAVELLING}")
        if problems:
            raise ConfigError(f"invalid StrategySpec {self.name!r}: " + "; ".join(problems))

    @property
    def collaborative(self) -> bool:
        """Whether devices share tensors through a server."""
        return bool(self.shared_roles) and not self.centralized

    @property
    def plain_mean(self) -> bool:
        """Whether the rule is the plain mean (a server may then stream it, or weigh it by tokens)."""
        return self.rule == "mean"

    @property
    def weighs_by_tokens(self) -> bool:
        """Whether the rule weighs each upload by its training tokens whatever the aggregation setting (FlexLoRA);
        a server then refuses uploads without a positive count."""
        return self.rule in TOKEN_RULES

    def travels(self, name: str) -> bool:
        """Whether the shared tensor ``name`` is uploaded after each round."""
        return self.travelling == "all" or name.endswith("lora_B")

    def device_shapes(self, shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
        """The shapes a device of LoRA rank ``rank`` holds, given the global (largest) shapes: every factor cut to
        ``min(rank, its global rank)`` where ranks differ between devices (the attention factors, of the expert rank
        on every device, keep theirs), else the shapes as they are."""
        if not self.rank_per_device:
            return dict(shapes)
        return {name: rank_shape(name, shape, rank) for name, shape in shapes.items()}

    def upload_shapes(self, shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
        """What a device of LoRA rank ``rank`` uploads: the tensors that travel, at its shapes."""
        return self.device_shapes({k: s for k, s in shapes.items() if self.travels(k)}, rank)


def _specs(*specs: StrategySpec) -> dict[str, StrategySpec]:
    return {s.name: s for s in specs}


#: Every strategy's server side, by name.
SPECS: dict[str, StrategySpec] = _specs(
    StrategySpec("centralized", centralized=True),
    StrategySpec("local", shared_roles=NO_ROLES),
    StrategySpec("fedavg"),
    StrategySpec("pcl", rule="pcl_relay"),
    StrategySpec("ffa-lora", travelling="lora_B"),
    StrategySpec("local-moe", shared_roles=NO_ROLES),
    StrategySpec("fedavg-moe"),
    StrategySpec("pfedmoe"),
    StrategySpec("local-moe-tr", shared_roles=NO_ROLES),
    StrategySpec("fedavg-moe-tr"),
    StrategySpec("comigs-tr"),
    StrategySpec("comigs-2s"),
    StrategySpec("comigs-2g"),
    StrategySpec("comigs-1g1s"),
    StrategySpec("comigs-1gxs"),
    *(StrategySpec(f"{family}-{match}", rule=family, rank_per_device=True)
      for family in ("hetlora", "flexlora") for match in ("active", "full")),
)

#: The six core strategies of ``--preset quick``.
CORE = ("local", "fedavg", "pfedmoe", "comigs-2s", "comigs-2g", "comigs-1g1s")
#: The paper's Table 4 ablations: routers trained jointly with the experts (ii) or alternating on training batches
#: (iii), for the expert layouts of Local (2S), FedAvg (2G) and CoMiGS-1G1S.
ABLATIONS = ("local-moe", "fedavg-moe", "local-moe-tr", "fedavg-moe-tr", "comigs-tr")
#: Every strategy, in table order.
ALL = ("centralized",) + CORE[:2] + ("pcl", "ffa-lora") + ABLATIONS[:2] + CORE[2:3] + ABLATIONS[2:] + CORE[3:] + (
    "comigs-1gxs", "hetlora-active", "hetlora-full", "flexlora-active", "flexlora-full")
#: Strategies whose per-device shape follows ``--experts`` (the others use two modules everywhere).
HETEROGENEOUS = ("comigs-1gxs", "hetlora-active", "hetlora-full", "flexlora-active", "flexlora-full")
#: Strategies a networked federation runs (all that share tensors through a server).
NETWORKED = tuple(n for n in ALL if SPECS[n].collaborative)
#: The default strategy of a networked federation: one generalist plus the specialists each device can hold.
DEFAULT_NETWORKED = "comigs-1gxs"


def spec_for(name: str) -> StrategySpec:
    """The server side of strategy ``name``.

    Raises:
        ConfigError: for an unknown name (listing the known ones).
    """
    spec = SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(ALL)}")
    return spec


def networked_spec(name: str) -> StrategySpec:
    """The server side of a strategy devices can run against an aggregator.

    Raises:
        ConfigError: for an unknown name, for ``local`` and its ablations (nothing to share) and ``centralized``
            (pools the users' data: an upper bound for the simulation, not a federation).
    """
    spec = spec_for(name)
    if not spec.collaborative:
        why = "pools every user's data" if spec.centralized else "shares nothing"
        raise ConfigError(f"strategy {name!r} {why}; it runs in `python -m device_sdk simulate` only. A networked "
                          f"federation supports {', '.join(NETWORKED)}")
    return spec
