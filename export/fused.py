"""Fused adapter products for the ExecuTorch KV-cache program: the same function as the model's LoRA and LoRA-MoE
layers, in a few larger products per token instead of two small ones per adapter.

At one token per decode step a small product costs about as much for its call as for its bytes (2.2 us per fp32
product in SmolLM2's 8da8w program, which makes 1,020 of them per token beside 211 quantised base linears).
Fused, per layer:

* attention: one product with the stacked A matrices of q, k and v, then one per projection with its scaled B
  placed at its columns of the stack (zero elsewhere), and o's pair: 6 products instead of 8;
* MLP, projection experts (``mixing="projection"``, or a single expert): per projection one product with the
  stacked A of all experts, the gates applied per expert's rank block, and one with the B matrices side by side;
* Q4_1 base linears (8da4w) that read one input share one block-sum product (:func:`export.quantize.shared_input`).

MLP blocks of whole-MLP experts (``mixing="mlp"``, the default) stay as they are: two products per expert and
projection. Each expert's product needs its own weight, and with a dynamic number of tokens XNNPACK slices nothing,
so the one-call forms left are a batched product, which repacks its constant operand at every call (it made the
8da8w decode slower: 2.1 ms per token for 180 batched products against 1.2 ms for the 630 small ones they
replaced), and a grouped 1x1 convolution, whose token-batch layout caps the program's input at 15 tokens
(executorch 1.x) and whose token-length layout needs transposes that cost what it saves. Measured in
docs/results.md.

The fused constants are built by :mod:`export.adapter_layout`, the one rule also used to write new adapters into a
program after a round, so the program and its ``adapters.ptd`` always agree.

Shapes: ``T`` tokens, ``D`` model width, ``F`` MLP width, ``E`` experts, ``r`` LoRA rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from device_sdk.lora import LoRALinear, LoRAMoELinear, RoutedMLP, constant_weight, dense_gates
from device_sdk.parts import iter_role_parameters

from .adapter_layout import FusedTensor, identity_layout
from .quantize import shared_input


class FusedAttentionLoRA(nn.Module):
    """The LoRAs of one attention block's q, k, v (one stacked A) and o; the projections themselves stay frozen
    base linears in the block."""

    def __init__(self, a_qkv: nn.Parameter, b_q: nn.Parameter, b_k: nn.Parameter, b_v: nn.Parameter,
                 a_o: nn.Parameter, b_o: nn.Parameter) -> None:
        super().__init__()
        self.a_qkv, self.b_q, self.b_k, self.b_v, self.a_o, self.b_o = a_qkv, b_q, b_k, b_v, a_o, b_o

    def qkv(self, x: torch.Tensor, q_proj: nn.Module, k_proj: nn.Module,
            v_proj: nn.Module) -> list[torch.Tensor]:
        """(1, T, D) -> [q (1, T, D_q), k (1, T, D_kv), v (1, T, D_kv)]."""
        low = F.linear(x, self.a_qkv)  # (1, T, 3r)
        bases = shared_input([q_proj, k_proj, v_proj], x)
        return [base + F.linear(low, b) for base, b in zip(bases, (self.b_q, self.b_k, self.b_v))]

    def o(self, x: torch.Tensor, o_proj: nn.Module) -> torch.Tensor:
        """(1, T, D_q) -> (1, T, D)."""
        return o_proj(x) + F.linear(F.linear(x, self.a_o), self.b_o)


class FusedProjectionMLP(nn.Module):
    """A routed Llama MLP block (SwiGLU) of projection experts (``mixing="projection"``, or a single expert), as
    :class:`device_sdk.lora.LoRAMoELinear`: each projection adds ``sum_e g_e B_e A_e x``, as one product with the
    experts' stacked A and one with their B side by side."""

    def __init__(self, block: RoutedMLP, make: Callable[..., nn.Parameter]) -> None:
        super().__init__()
        mlp = block.mlp
        self.gate_base, self.up_base, self.down_base = mlp.gate_proj.base, mlp.up_proj.base, mlp.down_proj.base
        self.act = mlp.act_fn
        self.n_experts, self.k, self.rank = block.n_experts, block.k, mlp.gate_proj.rank
        self.router = make("router", "same", [block.router.weight], 1.0) if block.router is not None else None
        for name in ("gate", "up", "down"):
            proj = getattr(mlp, f"{name}_proj")
            setattr(self, f"a_{name}", make(f"a_{name}", "rows", [e.lora_A for e in proj.experts], 1.0))  # (E*r, .)
            setattr(self, f"b_{name}", make(f"b_{name}", "cols", [e.lora_B for e in proj.experts],
                                            proj.scale))  # (., E*r)

    def _gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """(1, T, D) -> dense gates (1, T, E), zero outside the top k; ``None`` for a single expert."""
        return None if self.router is None else dense_gates(F.linear(x, self.router), self.k).to(x.dtype)

    def _low(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """``sum_e g_e B_e A_e x``: (1, T, D_in) -> (1, T, D_out)."""
        low = F.linear(x, a)  # (1, T, E*r)
        if g is not None:
            low = (low.view(1, -1, self.n_experts, self.rank) * g.unsqueeze(-1)).view(1, -1, self.n_experts * self.rank)
        return F.linear(low, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, D) -> (1, T, D)."""
        g = self._gates(x)
        base_gate, base_up = shared_input([self.gate_base, self.up_base], x)
        h = self.act(base_gate + self._low(x, self.a_gate, self.b_gate, g)) * (
            base_up + self._low(x, self.a_up, self.b_up, g))  # (1, T, F)
        return self.down_base(h) + self._low(h, self.a_down, self.b_down, g)


def _fusable_attention(attn: nn.Module) -> bool:
    return all(isinstance(getattr(attn, f"{p}_proj", None), LoRALinear) for p in "qkvo")


def _fusable_mlp(block: nn.Module) -> bool:
    mlp = getattr(block, "mlp", None)
    return isinstance(block, RoutedMLP) and block.mixing == "projection" and all(
        isinstance(getattr(mlp, f"{p}_proj", None), LoRAMoELinear) for p in ("gate", "up", "down")) \
        and hasattr(mlp, "act_fn")


def fuse_adapters(program: nn.Module, copy_first: bool = True) -> tuple[nn.Module, list[FusedTensor]]:
    """Fuse the adapter products of a KV-cache program (:class:`export.kv.KVCacheLM`).

    Every decoder layer whose attention projections all carry a LoRA gets a :class:`FusedAttentionLoRA` (its
    projections become their frozen bases), and every routed Llama MLP block of projection experts (or of a single
    expert) becomes a :class:`FusedProjectionMLP`. Adapter tensors of anything else (whole-MLP experts) keep their
    own constants.

    Args:
        program: a KV-cache program over a personalised Llama-family model (fp32 or quantised).
        copy_first: fuse a deep copy (the program's model stays as it was, e.g. for verification).

    Returns:
        ``(fused_program, layout)``: the program computing the same function, and one :class:`FusedTensor` per
        adapter constant, named by its parameter name under ``program.model``.
    """
    if copy_first:
        program = copy.deepcopy(program)
    model = program.model
    tensors = {name: p for name, p, _ in iter_role_parameters(model)}  # by their names in the adapter files
    names = {id(p): name for name, p in tensors.items()}
    layout: list[FusedTensor] = []

    def maker(prefix: str):
        def make(attr: str, kind: str, params: list[nn.Parameter], scale: float, slot: int = 0,
                 slots: int = 1) -> nn.Parameter:
            spec = FusedTensor(f"{prefix}.{attr}", kind, tuple(names[id(p)] for p in params), float(scale), slot,
                               slots)
            layout.append(spec)
            return constant_weight(spec.build(tensors))
        return make

    for i, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}"
        if _fusable_attention(attn):
            make = maker(f"{prefix}.self_attn.lora_fused")
            proj = {p: getattr(attn, f"{p}_proj") for p in "qkvo"}
            fused = FusedAttentionLoRA(
                make("a_qkv", "rows", [proj[p].lora.lora_A for p in "qkv"], 1.0),
                *(make(f"b_{p}", "slot_cols", [proj[p].lora.lora_B], proj[p].scale, slot, 3)
                  for slot, p in enumerate("qkv")),
                make("a_o", "same", [proj["o"].lora.lora_A], 1.0),
                make("b_o", "same", [proj["o"].lora.lora_B], proj["o"].scale))
            for p in "qkvo":
                setattr(attn, f"{p}_proj", proj[p].base)
            attn.lora_fused = fused
        if _fusable_mlp(layer.mlp):
            layer.mlp = FusedProjectionMLP(layer.mlp, maker(f"{prefix}.mlp"))
    used = {s for spec in layout for s in spec.sources}
    layout += identity_layout([name for name in tensors if name not in used])
    return program, layout


__all__ = ["FusedAttentionLoRA", "FusedProjectionMLP", "fuse_adapters"]
