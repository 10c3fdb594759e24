"""PCL (Wagner et al., 2024, strategy 2): personalised aggregation with client-level trust from validation
performance.

Every round, device ``i`` scores every device's model by its own validation loss ``L_ij`` and takes the
trust-weighted average ``theta_i = sum_j w_ij theta_j`` with ``w_i = softmax(-L_i / temperature)``. The server
only relays: its global file bundles every upload (``peer<j>/<name>``), and each device scores and mixes on its own
data, so no validation loss leaves a device (a download grows with the number of devices). Our reading
of "validation performance-based" trust: a low temperature makes a device trust mainly models that predict its
own data well, which is how the CoMiGS paper describes PCL's near-identity trust on in-distribution tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import OwnLoss, Upload
from .homogeneous import TwoModules


def bundle(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """Every upload's tensors under ``peer<j>/<name>`` (``j``: position in ``uploads``)."""
    return {f"peer{j}/{name}": t for j, u in enumerate(uploads) for name, t in u.tensors.items()}


def unbundle(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The uploads of a :func:`bundle`, in order.

    Raises:
        ConfigError: if a name is not ``peer<j>/<name>``.
    """
    peers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, sep, name = key.partition("/")
        if not (sep and head.startswith("peer") and head[4:].isdigit()):
            raise ConfigError(f"PCL expects a bundle of peer models named 'peer<j>/<tensor>', got {key!r}")
        peers.setdefault(int(head[4:]), {})[name] = t
    return [peers[j] for j in sorted(peers)]


@dataclass
class PCL(TwoModules):
    temperature: float = 0.1

    def server_rule(self, uploads: list[Upload]) -> dict[str, torch.Tensor]:
        return bundle(uploads)

    def receive(self, global_tensors, own: Upload, own_loss: OwnLoss | None = None):
        """Score every peer's model on this device's validation data, mix them by trust."""
        if own_loss is None:
            raise ConfigError("PCL needs the device's validation loss of every peer model (own_loss)")
        peers = unbundle(global_tensors)
        losses = torch.tensor([own_loss(p) for p in peers], dtype=torch.float64)
        weights = trust_from_losses(losses[None], self.temperature)[0]
        self.state.setdefault("trust", {}).setdefault(str(own.user), []).append(weights.tolist())
        mixed = {}
        for name, t in own.tensors.items():
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for w, peer in zip(weights.tolist(), peers):
                acc += w * peer[name].to(torch.float64)
            mixed[name] = acc.to(t.dtype)
        return mixed


def trust_from_losses(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise ``softmax(-losses / temperature)``: row ``i`` weighs the models by user ``i``'s validation loss."""
    if temperature <= 0:
        raise ConfigError(f"PCL temperature must be > 0, got {temperature}")
    return torch.softmax(-losses / temperature, dim=1)


def pcl() -> PCL:
    return PCL("pcl", router_mode="fixed", generalists=2)
