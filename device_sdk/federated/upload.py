"""What one device sends after local training, as every rule sees it: named tensors and per-device metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .roles import Role
from .tensors import factor_rank, fit, lora_scale


@dataclass
class Upload:
    """What one device sends after local training.

    Attributes:
        user: the device's index in the federation (0..n-1; a server numbers one round's uploads in order).
        tensors: ``{name: tensor}`` of the shared adapter tensors.
        tokens: training tokens seen this round (for token-weighted rules).
        rank: the device's LoRA rank of one MLP expert (HetLoRA / FlexLoRA: its budget's rank; the attention
            LoRA may have another, read from its tensors).
        alpha: the device's LoRA alpha; every LoRA module's scale follows from it and the module's own rank
            (:meth:`scale_of`).
        roles: ``{name: role}`` of ``tensors`` where the uploader knows them (a device does; a server, which sees
            names only, leaves it empty).
    """

    user: int
    tensors: dict[str, torch.Tensor]
    tokens: int
    rank: int
    alpha: float
    roles: dict[str, Role] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The LoRA scale gamma of the device's MLP experts, ``alpha / sqrt(rank)`` (paper eq. 4)."""
        return lora_scale(self.alpha, self.rank)

    def scale_of(self, name: str) -> float:
        """The LoRA scale gamma of the module that factor ``name`` belongs to: ``alpha / sqrt(r)`` with ``r`` its
        own rank, read from the factor's shape (``lora_A`` (r, D_in): rows; ``lora_B`` (D_out, r): columns)."""
        return lora_scale(self.alpha, factor_rank(name, self.tensors[name]))


def largest(uploads: list[Upload], name: str) -> torch.Tensor:
    """The upload's tensor ``name`` with the most elements (the highest rank)."""
    return max((u.tensors[name] for u in uploads if name in u.tensors), key=lambda t: t.numel())


def common_start(uploads: list[Upload]) -> list[dict[str, torch.Tensor]]:
    """Common starting values before round 1: every device gets, per name, the largest initial tensor cut to its
    own shape (identical shapes: user 0's values), so that shared tensors (and FFA-LoRA's frozen A) agree.

    Args:
        uploads: every device's initial tensors (all its shared roles, also those that do not travel).

    Returns:
        What each device loads, in the order of ``uploads``.
    """
    return [{name: fit(largest(uploads, name), t.shape) for name, t in u.tensors.items()} for u in uploads]
