"""Parameter roles: which adapter tensors are attention LoRA, generalist, specialist or router.

Roles are read from the module structure (each adapter module carries a ``role``), never from name substrings.
:class:`Role` and :data:`SHARED_ROLES` (which roles leave the device) are defined once, in
:mod:`device_sdk.federated.roles`, where a server reads them too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .errors import SDKError
from .federated.roles import SHARED_ROLES, Role

#: Roles trained by the expert optimizer on the training set (Algorithm 1, eq. 2).
EXPERT_ROLES: frozenset[Role] = frozenset({Role.ATTENTION, Role.GENERALIST, Role.SPECIALIST})


__all__ = ["EXPERT_ROLES", "SHARED_ROLES", "Role", "check_every_trainable_has_a_role", "count_parameters",
           "iter_role_parameters", "role_parameters", "role_state_dict"]


def iter_role_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Role]]:
    """Yield ``(qualified_name, parameter, role)`` for every adapter parameter of ``model``.

    A module takes part when it has a ``role`` attribute of type :class:`Role`; its own (non-recursive)
    parameters all carry that role.
    """
    for module_name, module in model.named_modules():
        role = getattr(module, "role", None)
        if not isinstance(role, Role):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            yield (f"{module_name}.{param_name}" if module_name else param_name), param, role


def role_parameters(model: nn.Module, roles: Role | frozenset[Role] | set[Role]) -> dict[str, nn.Parameter]:
    """Return ``{name: parameter}`` for the adapter parameters whose role is in ``roles``."""
    wanted = {roles} if isinstance(roles, Role) else set(roles)
    return {name: p for name, p, role in iter_role_parameters(model) if role in wanted}


def role_state_dict(model: nn.Module, roles: Role | frozenset[Role] | set[Role]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the adapter tensors with the given roles, keyed by qualified name."""
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in role_parameters(model, roles).items()}


def check_every_trainable_has_a_role(model: nn.Module) -> None:
    """Raise if a trainable parameter is not an adapter parameter (the base model must stay frozen).

    Raises:
        SDKError: naming the offending parameters.
    """
    with_role = {id(p) for _, p, _ in iter_role_parameters(model)}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in with_role]
    if stray:
        raise SDKError(
            f"{len(stray)} trainable parameter(s) have no adapter role, e.g. {stray[:3]}; the base model must be "
            "frozen. Call device_sdk.inject.inject_adapters on a fresh base model."
        )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Number of scalar parameters per role, plus ``base`` for everything without a role."""
    counts = {role.value: 0 for role in Role}
    seen = set()
    for _, p, role in iter_role_parameters(model):
        counts[role.value] += p.numel()
        seen.add(id(p))
    counts["base"] = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return counts
