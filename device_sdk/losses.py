"""Language-modelling and load-balancing losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .device_select import model_device
from .lora import RoutedMLP


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy.

    Args:
        logits: (B, T, V) predictions for positions ``0..T-1``.
        targets: (B, T) the tokens that follow each position.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def importance_weights(n_experts: int, n_generalists: int,
                       device: str | torch.device | None = None) -> torch.Tensor:
    """Generalist-favoured weights of paper eq. 5, normalised to mean 1 so that 2 experts give uniform weights.

    With one generalist and top-2 routing the minimiser puts router probability 1/2 on the generalist and
    ``1 / (2 (n-1))`` on each specialist, which is the intent stated in appendix C.4.

    Args:
        n_experts: experts of the block (E).
        n_generalists: generalists among them (the weighting needs exactly one; otherwise uniform).
        device: where the weights are created (``None``: the CPU).

    Returns:
        (E,) weights with mean 1.
    """
    if n_generalists != 1 or n_experts < 2:
        return torch.ones(n_experts, device=device)
    w = torch.full((n_experts,), float(n_experts - 1), device=device)
    w[0] = 1.0
    return w * n_experts / w.sum()


def block_balance_loss(probs: torch.Tensor, gates: torch.Tensor, weights: torch.Tensor,
                       count: bool = False) -> torch.Tensor:
    """Switch-style balance loss of one block: ``E * sum_j w_j f_j P_j``.

    ``P_j`` is the mean router probability of expert j (differentiable) and ``f_j`` (no gradient) the fraction of
    routed weight that expert j receives (the mean top-k gate), or with ``count`` the fraction of top-k memberships
    divided by k (paper eq. 6, normalised as the authors' code does). With k = 1 both are Switch's dispatch
    fraction. With k = E (two experts, top-2) every count is 1/k and ``sum_j P_j = 1``, so the count form is a
    constant without gradient, while the gate form still varies. Both equal 1 for balanced routing with uniform
    weights.

    Args:
        probs: (N, E) softmax over all router logits.
        gates: (N, E) top-k gates, rows summing to 1.
        weights: (E,) per-expert weights (ones for the uniform loss).
        count: take ``f_j`` from top-k memberships instead of gate weights.
    """
    n_experts = probs.shape[-1]
    p_mean = probs.mean(dim=0)  # (E,)
    if count:
        chosen = (gates.detach() > 0).to(probs.dtype)  # (N, E) top-k memberships
        f = chosen.mean(dim=0) / chosen.sum(dim=-1).mean()  # (E,), sums to 1
    else:
        f = gates.detach().mean(dim=0)  # (E,)
    return n_experts * (weights.to(probs.device) * f * p_mean).sum()


def load_balancing_loss(model: nn.Module, mode: str = "switch", n_generalists: int = 1) -> torch.Tensor:
    """Mean over routed MLP blocks of :func:`block_balance_loss` for the last forward pass (0 without routers).

    Args:
        model: a model with :class:`RoutedMLP` blocks that has just run a forward pass.
        mode: one of :data:`device_sdk.config.LB_MODES`: ``switch`` / ``count`` (uniform weights), ``importance``
            / ``importance-count`` (paper eq. 5), ``none``.
        n_generalists: generalists per block (importance weighting needs exactly one).

    Returns:
        A scalar on the device of the router probabilities (of the model's parameters without routers).
    """
    losses = []
    if mode != "none":
        for module in model.modules():
            if isinstance(module, RoutedMLP) and module.router_probs is not None:
                e, device = module.n_experts, module.router_probs.device
                w = (importance_weights(e, n_generalists, device) if mode.startswith("importance")
                     else torch.ones(e, device=device))
                losses.append(block_balance_loss(module.router_probs, module.gates, w, count=mode.endswith("count")))
    if not losses:
        return torch.zeros((), device=model_device(model))
    return torch.stack(losses).mean()
