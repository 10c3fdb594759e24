"""The device side of CoMiGS: LoRA mixtures of generalists and specialists, trained bi-level on a device."""

from .adapters import load_adapters, save_adapters
from .config import AdapterConfig, TrainConfig
from .data import UserData, load_user_data, load_users
from .errors import SDKError
from .evaluate import evaluate
from .inject import inject_adapters
from .models import BaseModel, load_base_model
from .parts import SHARED_ROLES, Role, role_state_dict
from .train import TrainState, init_train_state, train_local

__all__ = [
    "SHARED_ROLES", "AdapterConfig", "BaseModel", "Role", "SDKError", "TrainConfig", "TrainState", "UserData",
    "evaluate", "init_train_state", "inject_adapters", "load_adapters", "load_base_model", "load_user_data",
    "load_users", "role_state_dict", "save_adapters", "train_local",
]
