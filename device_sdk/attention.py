"""Attention of the SDK's base models: Hugging Face's ``sdpa``, in fp32 when a CPU trains under bf16 autocast.

Under CPU autocast, scaled-dot-product attention runs in bf16. On CPUs the bf16 flash-attention backward is slower
than fp32 (about 2x on an AVX-512/AMX Xeon, far more where bf16 is emulated), while its forward is faster. So
while bf16 autocast is on, the tensors are on the CPU and gradients are being recorded (a backward will follow),
:func:`attention_forward` casts ``q``, ``k``, ``v`` to fp32 and runs ``sdpa`` with autocast off: a training step
of SmolLM2-135M takes 10-15% less time (docs/results.md). Everywhere else (evaluation under ``no_grad``, GPUs, fp32
runs, traced exports, which run without autocast) it is ``sdpa`` unchanged. The projections around it stay bf16.

Shapes: ``B`` batch, ``H`` heads (``H_kv`` key/value heads), ``T`` query and ``S`` key tokens, ``d`` head width.
"""

from __future__ import annotations

import torch
from torch import nn

#: The name the SDK's attention is registered under in transformers' ``AttentionInterface``.
NAME = "sdpa_cpu_fp32"


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``sdpa_attention_forward``, in fp32 under CPU bf16 autocast with gradients enabled.

    Args:
        query: (B, H, T, d); key, value: (B, H_kv, S, d).
        attention_mask: ``None``, a boolean mask or an additive float mask broadcastable to (B, H, T, S).

    Returns:
        ``(attn_output (B, T, H, d), None)``, in the autocast dtype when the fp32 path ran.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(torch.get_autocast_dtype("cpu")), weights


def use_sdk_attention(model: nn.Module) -> nn.Module:
    """Point a Hugging Face model that uses ``sdpa`` at :func:`attention_forward` (registered as :data:`NAME`);
    models with another attention (``eager``, flash kernels) are left alone. Returns ``model``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without a mask function, transformers drops every mask
    config._attn_implementation = NAME
    return model


__all__ = ["NAME", "attention_forward", "use_sdk_attention"]
