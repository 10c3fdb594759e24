"""Quantised ExecuTorch programs (torchao): base linears and the output projection get int8 dynamic activations
with int4 weights in groups of 32 (``8da4w``) or int8 weights per output channel (``8da8w``); the token embedding
gets int8 weights; adapters and routers stay fp32.

Measured on SmolLM2-135M (whose weights come from a Q4_1 GGUF file, i.e. are already on a 4-bit grid): int4
re-quantisation rounds every block a second time (perplexity +41% from the base linears alone, +24% with
asymmetric int4), int8 weights cost about 1-2%. See docs/results.md."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ExportError


def _untie_output_embedding(model: nn.Module) -> None:
    """Give a tied output projection its own weight, so that the int8 embedding does not turn it into an int8
    weight-only linear (which XNNPACK does not lower: a ``dequantize_affine`` op would be left without kernel)."""
    for module in model.modules():
        head = getattr(module, "lm_head", None)
        if isinstance(head, nn.Linear):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def quantize_program(model: nn.Module, scheme: str = "8da4w", group_size: int = 32) -> tuple[nn.Module, dict]:
    """A quantised copy of ``model`` (the original stays fp32 for verification).

    Args:
        scheme: ``8da4w`` (int4 weights, groups of ``group_size``) or ``8da8w`` (int8 weights per channel).

    Returns:
        ``(quantised_model, {"linears": n, "embeddings": m})``.

    Raises:
        ExportError: if no base projection is an ``nn.Linear`` (GPT-2's Conv1D is not supported) or a width is not
            a multiple of ``group_size``.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    quantised = copy.deepcopy(model)
    _untie_output_embedding(quantised)
    base_linears = [(fqn, m) for fqn, m in quantised.named_modules()
                    if isinstance(m, nn.Linear) and (fqn.endswith(".base") or fqn.endswith("lm_head"))]
    if not any(fqn.endswith(".base") for fqn, _ in base_linears):
        raise ExportError(f"{scheme} needs nn.Linear base projections (Llama family); this model's projections "
                          "are not nn.Linear (GPT-2 uses Conv1D). Export with --quantize none")
    odd = [fqn for fqn, m in base_linears if m.in_features % group_size]
    if odd and scheme == "8da4w":
        raise ExportError(f"8da4w groups of {group_size} need input widths divisible by {group_size}; not: {odd[:2]}")
    if scheme == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(group_size))
    elif scheme == "8da8w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        raise ExportError(f"unknown quantisation scheme {scheme!r}; choose 8da4w or 8da8w")
    quantize_(quantised, config,
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (fqn.endswith(".base") or fqn.endswith("lm_head")))
    embeddings = [m for m in quantised.modules() if isinstance(m, nn.Embedding)]
    for embedding in embeddings:
        # padding_idx only shapes gradients; left set, it hides the int8 embedding from ExecuTorch's quant fusion
        # pass and a bare dequantize_affine without kernel stays in the program (SmolLM2 pads with token 2)
        embedding.padding_idx = None
    quantize_(quantised, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return quantised, {"linears": len(base_linears), "embeddings": len(embeddings)}
