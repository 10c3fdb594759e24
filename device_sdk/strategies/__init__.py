"""Collaboration strategies behind one interface (:class:`Strategy`): the paper's method and its baselines.

``make_strategy(name)`` builds one by its command-line name; :data:`CORE` are the six of the quick preset,
:data:`ALL` every strategy.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Strategy, Upload, fit, mean_tensors
from .comigs_x import comigs_1gxs
from .flexlora import flexlora
from .hetlora import hetlora
from .homogeneous import (
    centralized,
    comigs,
    comigs_tr,
    fedavg,
    fedavg_moe,
    fedavg_moe_tr,
    ffa_lora,
    local,
    local_moe,
    local_moe_tr,
    pfedmoe,
)
from .pcl import pcl

_FACTORIES = {
    "local": local,
    "fedavg": fedavg,
    "pfedmoe": pfedmoe,
    "comigs-2s": lambda: comigs("2s"),
    "comigs-2g": lambda: comigs("2g"),
    "comigs-1g1s": lambda: comigs("1g1s"),
    "centralized": centralized,
    "pcl": pcl,
    "ffa-lora": ffa_lora,
    "local-moe": local_moe,
    "fedavg-moe": fedavg_moe,
    "local-moe-tr": local_moe_tr,
    "fedavg-moe-tr": fedavg_moe_tr,
    "comigs-tr": comigs_tr,
    "comigs-1gxs": comigs_1gxs,
    "hetlora-active": lambda: hetlora("active"),
    "hetlora-full": lambda: hetlora("full"),
    "flexlora-active": lambda: flexlora("active"),
    "flexlora-full": lambda: flexlora("full"),
}

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
NETWORKED = tuple(n for n in ALL if _FACTORIES[n]().collaborative)
#: The default strategy of a networked federation: one generalist plus the specialists each device can hold.
DEFAULT_NETWORKED = "comigs-1gxs"


def networked_strategy(name: str) -> Strategy:
    """A strategy devices can run against the aggregator: every strategy that shares tensors through a server.

    Raises:
        ConfigError: for ``local`` (nothing to share) and ``centralized`` (pools the users' data: an upper bound for
            the simulation, not a federation).
    """
    strategy = make_strategy(name)
    if not strategy.collaborative:
        why = "pools every user's data" if strategy.centralized else "shares nothing"
        raise ConfigError(f"strategy {name!r} {why}; it runs in `python -m device_sdk simulate` only. A networked "
                          f"federation supports {', '.join(NETWORKED)}")
    return strategy


def make_strategy(name: str) -> Strategy:
    """A fresh strategy by name.

    Raises:
        ConfigError: for an unknown name (listing the known ones).
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(ALL)}")
    return factory()


__all__ = ["ABLATIONS", "ALL", "CORE", "DEFAULT_NETWORKED", "HETEROGENEOUS", "NETWORKED", "Strategy", "Upload", "fit", "make_strategy",
           "mean_tensors", "networked_strategy"]
