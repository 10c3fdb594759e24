"""Collaboration strategies behind one interface (:class:`Strategy`): the paper's method and its baselines.

``make_strategy(name)`` builds one by its command-line name; :data:`CORE` are the six of the quick preset,
:data:`ALL` every strategy. The names and each one's server side (rule, shared roles, what travels) are defined in
:mod:`device_sdk.federated.catalog`, which a server reads without this package's model code.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..federated import Upload, fit, networked_spec, spec_for
from ..federated import mean as mean_tensors
from ..federated.catalog import ABLATIONS, ALL, CORE, DEFAULT_NETWORKED, HETEROGENEOUS, NETWORKED
from .base import Strategy
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

#: The device side of every strategy in the catalog, by name.
_FACTORIES: dict[str, Callable[[], Strategy]] = {
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
assert set(_FACTORIES) == set(ALL), "every catalog strategy needs a device side"  # a programming error, not input


def make_strategy(name: str) -> Strategy:
    """A fresh strategy by name.

    Raises:
        ConfigError: for an unknown name (listing the known ones).
    """
    spec_for(name)  # an unknown name fails here, listing the known ones
    return _FACTORIES[name]()


def networked_strategy(name: str) -> Strategy:
    """A strategy devices can run against the aggregator: every strategy that shares tensors through a server.

    Raises:
        ConfigError: for ``local`` (nothing to share) and ``centralized`` (pools the users' data: an upper bound for
            the simulation, not a federation).
    """
    networked_spec(name)
    return make_strategy(name)


__all__ = ["ABLATIONS", "ALL", "CORE", "DEFAULT_NETWORKED", "HETEROGENEOUS", "NETWORKED", "Strategy",
           "Upload", "fit", "make_strategy", "mean_tensors", "networked_strategy"]
