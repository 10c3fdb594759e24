"""One device's round, written once: load what the server published, then begin, bi-level training, end, and what
is uploaded. A networked device (:meth:`device_sdk.device.Device.run_round`), the in-process simulation
(:func:`device_sdk.sim.run_strategy`) and any other engine's client (Flower) run these functions; only how the
tensors travel differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import assign_tensors
from .config import TrainConfig
from .data import UserData
from .federated import Upload, fit
from .parts import role_parameters
from .strategies.base import OwnLoss, Strategy, device_upload
from .train import TrainResult, TrainState, train_local


@dataclass
class DeviceRound:
    """What one device's round produced.

    Attributes:
        upload: the shared tensors that travel (CPU copies), with the round's training tokens, the device's rank,
            alpha and tensor roles (empty tensors for a strategy that shares nothing).
        result: the local training's curves and token count.
        state: the training state to continue from.
    """

    upload: Upload
    result: TrainResult
    state: TrainState

    @property
    def train_loss(self) -> float:
        """Mean language-model loss over the round's logged training steps."""
        return sum(r["lm"] for r in self.result.train) / max(1, len(self.result.train))


def load_shared(strategy: Strategy, model: nn.Module, tensors: dict[str, torch.Tensor], names, what: str) -> None:
    """Copy ``tensors`` into ``model``'s shared parameters ``names`` (exactly those; names, shapes, dtypes and finite
    values checked first, nothing changed if a check fails).

    Raises:
        AdapterFileError: naming ``what`` and the differences.
    """
    params = role_parameters(model, strategy.shared_roles)
    assign_tensors({name: params[name] for name in names}, tensors, what)


def load_initial(strategy: Strategy, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a federation's common starting tensors (global version 0: every shared tensor, and FFA-LoRA's frozen A,
    at the largest shapes), cut to this device's shapes where ranks differ between devices.

    Raises:
        AdapterFileError: if the names or shapes do not fit the model.
    """
    expected = strategy.initial_tensors(model)
    if strategy.rank_per_device:  # cut to this device's rank; names are checked on loading
        tensors = {name: fit(t, expected[name].shape) if name in expected else t for name, t in tensors.items()}
    load_shared(strategy, model, tensors, expected, "the global shared tensors")


def receive_global(strategy: Strategy, user: int, model: nn.Module, global_tensors: dict[str, torch.Tensor],
                   own_loss: OwnLoss | None = None, own: Upload | None = None) -> None:
    """Load a round's global tensors through the strategy's receive step (the mean as is; a cut to the device's
    rank; PCL's trust-weighted mix of its peers, scored with ``own_loss``).

    Args:
        own: what this device uploaded in the round (default: its shared tensors now, which are the same).

    Raises:
        AdapterFileError: if what the receive step returns does not fit the model.
    """
    own = own if own is not None else device_upload(user, model, strategy.shared_tensors(model))
    load_shared(strategy, model, strategy.receive(global_tensors, own, own_loss), own.tensors,
                "the global shared tensors")


def run_device_round(strategy: Strategy, user: int, model: nn.Module, state: TrainState | None, data: UserData,
                     cfg: TrainConfig, global_tensors: dict[str, torch.Tensor] | None = None, *,
                     own_loss: OwnLoss | None = None, progress: bool = False,
                     on_step: Callable[[dict], None] | None = None) -> DeviceRound:
    """One round of Algorithm 1 on one device: load ``global_tensors`` (if given) through the receive step, then
    the strategy's begin step, local bi-level training, its end step, and the upload.

    Args:
        strategy: the collaboration strategy (its per-run ``state`` is updated).
        user: the device's index (0 on a real device; the simulation's user number).
        model: the device's model with adapters, on ``cfg.device``.
        state: the training state to continue from (``None``: start fresh).
        data: the device's token streams.
        cfg: local training, with the strategy's overrides applied.
        global_tensors: the server's global tensors of the previous round, or ``None`` when already loaded.
        own_loss: the device's validation loss with other shared tensors loaded (PCL's receive step).
        progress: show a progress bar.
        on_step: called after every expert step (see :func:`device_sdk.train.train_local`).

    Returns:
        The upload (what the server receives), the training result and the state to continue from.
    """
    if global_tensors is not None:
        receive_global(strategy, user, model, global_tensors, own_loss)
    strategy.begin_round(user, model)
    result, state = train_local(model, data, cfg, state, progress=progress, regularizer=strategy.regularizer(user),
                                on_step=on_step)
    strategy.end_round(user, model)
    upload = device_upload(user, model, strategy.shared_tensors(model), result.tokens)
    return DeviceRound(upload, result, state)
