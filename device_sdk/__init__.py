"""The device side of CoMiGS: LoRA mixtures of generalists and specialists, trained bi-level on a device.

Names are imported on first use (module ``__getattr__``), so ``import device_sdk.federated`` or
``device_sdk.errors`` (what an aggregator needs) does not load the model and training code (transformers).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "load_adapters": "adapters", "save_adapters": "adapters",
    "specialists_for_budget": "budget",
    "AdapterConfig": "config", "TrainConfig": "config",
    "UserData": "data", "load_user_data": "data", "load_users": "data",
    "Device": "device", "DeviceConfig": "device", "RoundReport": "device",
    "BudgetError": "errors", "Cancelled": "errors", "SDKError": "errors",
    "evaluate": "evaluate",
    "inject_adapters": "inject",
    "BaseModel": "models", "load_base_model": "models",
    "SHARED_ROLES": "parts", "Role": "parts", "role_state_dict": "parts",
    "TrainState": "train", "init_train_state": "train", "train_local": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``device_sdk.evaluate`` stays the function of that name: importing the submodule ``device_sdk.evaluate``
    (which binds the module on its package) does not replace it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from .adapters import load_adapters, save_adapters
    from .budget import specialists_for_budget
    from .config import AdapterConfig, TrainConfig
    from .data import UserData, load_user_data, load_users
    from .device import Device, DeviceConfig, RoundReport
    from .errors import BudgetError, Cancelled, SDKError
    from .evaluate import evaluate
    from .inject import inject_adapters
    from .models import BaseModel, load_base_model
    from .parts import SHARED_ROLES, Role, role_state_dict
    from .train import TrainState, init_train_state, train_local
