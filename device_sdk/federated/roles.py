"""Adapter roles and the one place that says which of them leave a device.

A device reads roles from its module structure (:mod:`device_sdk.parts`); a server sees names only and needs the
role names for its configuration (``shared_roles``). Both take them from here.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """What an adapter parameter is for."""

    ATTENTION = "attention"
    GENERALIST = "generalist"
    SPECIALIST = "specialist"
    ROUTER = "router"


#: Roles whose tensors are averaged across devices by the aggregator (paper section 4.1.2: attention LoRA is
#: always aggregated; generalist experts are aggregated; specialists and routers never leave the device).
SHARED_ROLES: frozenset[Role] = frozenset({Role.ATTENTION, Role.GENERALIST})

#: No role: nothing leaves the device (Local and its ablations).
NO_ROLES: frozenset[Role] = frozenset()


def role_names(roles: frozenset[Role] | set[Role]) -> list[str]:
    """The roles' values, sorted (how a federation's configuration lists them)."""
    return sorted(r.value for r in roles)
