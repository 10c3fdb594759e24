"""Quantised ExecuTorch programs (torchao + XNNPACK), adapters and routers always fp32:

- ``8da8w``: base linears and the output projection get int8 weights per output channel with int8 dynamic
  activations; the token embedding int8 weights.
- ``8da4w``: base linears get int4 weights in blocks of 32 in GGUF's Q4_1 form (:mod:`export.blocks`: the int4
  kernel with zero point 0 plus an exact per-block offset term), with int8 dynamic activations; the output
  projection, the most sensitive layer, stays at 8da8w; the token embedding int8 weights.

SmolLM2-135M's weights come from a Q4_1 GGUF file, so its 8da4w base linears are exact (up to XNNPACK's bf16 block
scales); plain symmetric int4 rounded every block a second time (+41% perplexity from the base linears alone).
The offsets stay fp32: as an 8da8w product (a quarter of the bytes) the real program's check gave +5.9% perplexity
against +3.8%, and its lowering took half as long again. See docs/results.md."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from device_sdk.lora import constant_weight

from .blocks import q4_1_blocks
from .errors import ExportError

SCHEMES = ("8da4w", "8da8w")


def block_sums(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """``x`` (..., T, K) summed over each block of B inputs: (..., T, K / B).

    A product with ``ones`` (1, B) over the blocks as rows, not a (K / B, K) 0/1 matrix: a token reads B weights
    instead of K^2 / B (295 KB per down projection of SmolLM2, 12 MB per token in all). The reshapes keep one
    inferred dimension and no symbolic size, so XNNPACK delegates them."""
    lead, k, b = x.shape[:-2], x.shape[-1], ones.shape[-1]
    return F.linear(x.reshape(*lead, -1, b), ones).reshape(*lead, -1, k // b)


class BlockOffsetLinear(nn.Module):
    """A Q4_1 linear as its int4 part plus the per-block offsets: (..., K) -> (..., N).

    ``linear`` holds ``(q - 8) * scale`` on the int4 kernel; the offsets add ``(x summed per block) @ offsets^T``
    with the block sums of :func:`block_sums` (``ones`` (1, B), the linear's own: one constant shared by the
    linears of several layers puts them in one XNNPACK partition, and the lowering then fails with a dependency
    cycle) and ``offsets`` (N, K / B)."""

    def __init__(self, linear: nn.Linear, offsets: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.ones = constant_weight(torch.ones(1, linear.in_features // offsets.shape[1]))
        self.offsets = constant_weight(offsets)

    def forward(self, x: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
        """``sums``: ``x`` summed per block, (..., K / B), when the caller shares them between linears."""
        if sums is None:
            sums = block_sums(x, self.ones)
        return self.linear(x) + F.linear(sums, self.offsets)


def shared_input(linears: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of base linears that read the same input ``x`` (q, k and v; gate and up): the Q4_1 linears
    among them share one block-sum product instead of one each."""
    sums: torch.Tensor | None = None
    outputs = []
    for linear in linears:
        if isinstance(linear, BlockOffsetLinear):
            if sums is None:
                sums = block_sums(x, linear.ones)
            outputs.append(linear(x, sums))
        else:
            outputs.append(linear(x))
    return outputs


def _untie_output_embedding(model: nn.Module) -> None:
    """Give a tied output projection its own weight, so that the int8 embedding does not turn it into an int8
    weight-only linear (which XNNPACK does not lower: a ``dequantize_affine`` op would be left without kernel)."""
    for module in model.modules():
        head = getattr(module, "lm_head", None)
        if isinstance(head, nn.Linear):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def _is_base(fqn: str) -> bool:
    return fqn.endswith(".base")


def _is_head(fqn: str) -> bool:
    return fqn.endswith("lm_head")


def _q4_1_linears(model: nn.Module, linears: list[tuple[str, nn.Linear]], group_size: int) -> None:
    """Quantise ``linears`` (fp32 ``nn.Linear`` modules of ``model``) to Q4_1 blocks: each becomes a
    :class:`BlockOffsetLinear` whose int4 tensor holds ``q - 8`` and the block scales exactly."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    blocks = {fqn: q4_1_blocks(m.weight, group_size) for fqn, m in linears}
    wanted = set(blocks)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                           weight_granularity=PerGroup(group_size)),
              filter_fn=lambda m, fqn: fqn in wanted)
    for fqn, module in linears:
        q, offsets = blocks[fqn].symmetric()
        weight = module.weight  # torchao's IntxUnpackedToInt8Tensor: qdata (N, K) int8, scale, zero_point (N, K/B)
        with torch.no_grad():
            weight.qdata.copy_(q)
            weight.scale.copy_(blocks[fqn].scales)
            weight.zero_point.zero_()
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, BlockOffsetLinear(module, offsets))


def quantize_program(model: nn.Module, scheme: str = "8da4w", group_size: int = 32) -> tuple[nn.Module, dict]:
    """A quantised copy of ``model`` (the original stays fp32 for verification).

    Args:
        scheme: ``8da4w`` (int4 Q4_1 blocks of ``group_size`` on base linears, 8da8w output projection) or
            ``8da8w`` (int8 weights per channel).

    Returns:
        ``(quantised_model, {"linears": n, "embeddings": m})``.

    Raises:
        ExportError: for an unknown scheme, if no base projection is an ``nn.Linear`` (GPT-2's Conv1D is not
            supported) or a width is not a multiple of ``group_size``.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantisation scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    quantised = copy.deepcopy(model)
    _untie_output_embedding(quantised)
    base = [(fqn, m) for fqn, m in quantised.named_modules() if isinstance(m, nn.Linear) and _is_base(fqn)]
    heads = [(fqn, m) for fqn, m in quantised.named_modules() if isinstance(m, nn.Linear) and _is_head(fqn)]
    if not base:
        raise ExportError(f"{scheme} needs nn.Linear base projections (Llama family); this model's projections "
                          "are not nn.Linear (GPT-2 uses Conv1D). Export with --quantize none")
    odd = [fqn for fqn, m in base if m.in_features % group_size]
    if odd and scheme == "8da4w":
        raise ExportError(f"8da4w groups of {group_size} need input widths divisible by {group_size}; not: {odd[:2]}")
    per_channel = heads + (base if scheme == "8da8w" else [])
    if scheme == "8da4w":
        _q4_1_linears(quantised, base, group_size)
    names = {fqn for fqn, _ in per_channel}
    quantize_(quantised, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: fqn in names)
    embeddings = [m for m in quantised.modules() if isinstance(m, nn.Embedding)]
    for embedding in embeddings:
        # padding_idx only shapes gradients; left set, it hides the int8 embedding from ExecuTorch's quant fusion
        # pass and a bare dequantize_affine without kernel stays in the program (SmolLM2 pads with token 2)
        embedding.padding_idx = None
    quantize_(quantised, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return quantised, {"linears": len(base) + len(heads), "embeddings": len(embeddings)}
