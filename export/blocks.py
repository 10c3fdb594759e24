"""Int4 weight blocks in GGUF's Q4_1 form, ``scale * q + low`` per block: the one rule behind both int4 programs
(the ONNX ``MatMulNBits`` file, :func:`export.onnx.quantize_int4`, and the ExecuTorch 8da4w program,
:func:`export.quantize.quantize_program`).

Each block of ``block_size`` consecutive inputs of one output row gets ``low = min`` and ``scale = (max - min) /
15``, ``q`` in 0..15. Weights that come from a Q4_1 file (SmolLM2's GGUF) are represented exactly, where
symmetric or integer-zero-point int4 rounds every block a second time. The int4 kernels of both runtimes take a
zero point of 0 (XNNPACK: symmetric only), so a program computes

    x W^T = x ((q - 8) * scale)^T + (x summed per block) (low + 8 * scale)^T

the first term on the int4 kernel (``q - 8`` in -8..7), the second an exact float product 1/block_size the size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Q41Blocks", "q4_1_blocks"]


@dataclass(frozen=True)
class Q41Blocks:
    """A weight (N, K) as blocks: ``weight[n, b*B + i] = scales[n, b] * q[n, b*B + i] + lows[n, b]``.

    Attributes:
        q: (N, K) uint8 in 0..15.
        scales: (N, K / B) float32.
        lows: (N, K / B) float32.
        block_size: B.
    """

    q: torch.Tensor
    scales: torch.Tensor
    lows: torch.Tensor
    block_size: int

    def dequantize(self) -> torch.Tensor:
        """The represented weight, (N, K) float32."""
        n, k = self.q.shape
        blocks = self.q.float().view(n, k // self.block_size, self.block_size)
        return (blocks * self.scales[..., None] + self.lows[..., None]).reshape(n, k)

    def symmetric(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero-point-free form: ``(q - 8)`` (N, K) int8 in -8..7 and the per-block offsets ``low + 8 * scale``
        (N, K / B) float32, so that ``weight = (q - 8) * scale + offset`` per block."""
        return (self.q.to(torch.int8) - 8), self.lows + 8 * self.scales


def q4_1_blocks(weight: torch.Tensor, block_size: int = 32) -> Q41Blocks:
    """Q4_1 blocks of ``weight`` (N, K), blocks along K; ``K`` must be a multiple of ``block_size``.

    Raises:
        ValueError: if it is not.
    """
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"int4 blocks of {block_size} need an input width divisible by {block_size}, got {k}")
    blocks = weight.detach().float().reshape(n, k // block_size, block_size)
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scales = (high - low) / 15
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant block: q = 0, value in low
    q = torch.round((blocks - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return Q41Blocks(q=q.reshape(n, k), scales=scales, lows=low, block_size=block_size)

