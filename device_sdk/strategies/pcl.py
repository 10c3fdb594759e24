"""PCL (Wagner et al., 2024, strategy 2): personalised aggregation with client-level trust from validation
performance.

Every round, device ``i`` scores every device's model by its own validation loss ``L_ij`` and takes the
trust-weighted average ``theta_i = sum_j w_ij theta_j`` with ``w_i = softmax(-L_i / temperature)``. Our reading
of "validation performance-based" trust: a low temperature makes a device trust mainly models that predict its
own data well, which is how the CoMiGS paper describes PCL's near-identity trust on in-distribution tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import PeerLoss, Upload
from .homogeneous import TwoModules


@dataclass
class PCL(TwoModules):
    temperature: float = 0.1

    def trust(self, uploads: list[Upload], peer_loss: PeerLoss) -> torch.Tensor:
        """(n, n) row-stochastic trust matrix from the (n, n) validation losses ``L[i, j]``."""
        losses = torch.tensor([[peer_loss(u.user, v.tensors) for v in uploads] for u in uploads],
                              dtype=torch.float64)
        return trust_from_losses(losses, self.temperature)

    def aggregate(self, uploads, peer_loss=None):
        if peer_loss is None:
            raise ConfigError("PCL needs every device's validation loss of every model (peer_loss)")
        weights = self.trust(uploads, peer_loss)
        self.state.setdefault("trust", []).append(weights.tolist())
        out = []
        for i, _ in enumerate(uploads):
            mixed = {}
            for name, t in uploads[i].tensors.items():
                acc = torch.zeros(t.shape, dtype=torch.float64)
                for j, v in enumerate(uploads):
                    acc += float(weights[i, j]) * v.tensors[name].to(torch.float64)
                mixed[name] = acc.to(t.dtype)
            out.append(mixed)
        return out


def trust_from_losses(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-wise ``softmax(-losses / temperature)``: row ``i`` weighs the models by user ``i``'s validation loss."""
    if temperature <= 0:
        raise ConfigError(f"PCL temperature must be > 0, got {temperature}")
    return torch.softmax(-losses / temperature, dim=1)


def pcl() -> PCL:
    return PCL("pcl", router_mode="fixed", generalists=2)
