"""PCL (Wagner et al., 2024, strategy 2): personalised aggregation with client-level trust from validation
performance.

Every round, device ``i`` scores every device's model by its own validation loss ``L_ij`` and takes the
trust-weighted average ``theta_i = sum_j w_ij theta_j`` with ``w_i = softmax(-L_i / temperature)``. The server
only relays (:func:`device_sdk.federated.rules.bundle`: its global file holds every upload as ``peer<j>/<name>``),
and each device scores and mixes on its own data, so no validation loss leaves a device (a download grows with the
number of devices). Our reading of "validation performance-based" trust: a low temperature makes a device trust
mainly models that predict its own data well, which is how the CoMiGS paper describes PCL's near-identity trust on
in-distribution tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..federated import Upload
from ..federated.rules import bundle, unbundle  # noqa: F401  (re-exported: PCL's relay format)
from .base import OwnLoss, Strategy
from .homogeneous import TwoModules


def trust_from_losses(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise ``softmax(-losses / temperature)``: row ``i`` weighs the models by user ``i``'s validation loss."""
    if temperature <= 0:
        raise ConfigError(f"PCL temperature must be > 0, got {temperature}")
    return torch.softmax(-losses / temperature, dim=1)


@dataclass(frozen=True)
class TrustMix:
    """PCL's receive step: score every peer's model on this device's validation data, mix them by trust."""

    temperature: float = 0.1

    def __call__(self, global_tensors: dict[str, torch.Tensor], own: Upload, own_loss: OwnLoss | None,
                 state: dict) -> dict[str, torch.Tensor]:
        """Raises:
            ConfigError: without ``own_loss`` (the device's validation loss of a peer model).
        """
        if own_loss is None:
            raise ConfigError("PCL needs the device's validation loss of every peer model (own_loss)")
        peers = unbundle(global_tensors)
        losses = torch.tensor([own_loss(p) for p in peers], dtype=torch.float64)
        weights = trust_from_losses(losses[None], self.temperature)[0]
        state.setdefault("trust", {}).setdefault(str(own.user), []).append(weights.tolist())
        mixed = {}
        for name, t in own.tensors.items():
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for w, peer in zip(weights.tolist(), peers):
                acc += w * peer[name].to(torch.float64)
            mixed[name] = acc.to(t.dtype)
        return mixed


def pcl(temperature: float = 0.1) -> Strategy:
    """PCL with two generalists per MLP projection and fixed gates."""
    return Strategy("pcl", shape=TwoModules(2), router_mode="fixed", receive_step=TrustMix(temperature))
