"""Whole-MLP experts (the paper's model): expert ``e`` is the block's MLP with its own LoRA on every MLP projection,
and the block outputs ``sum_e g_e(x) * MLP_e(x)`` over the token's top-k experts.

For a gated MLP (Llama: ``MLP(x) = W_down (act(W_gate x) * W_up x)``) expert ``e`` is::

    h_e = act(W_gate x + s B^g_e A^g_e x) * (W_up x + s B^u_e A^u_e x)          # (N, F)
    MLP_e(x) = W_down h_e + s B^d_e A^d_e h_e

and for a plain MLP (GPT-2: ``c_proj(act(c_fc x))``) the same without the ``up`` factor. Nothing frozen is computed
more than once: ``W_gate x`` and ``W_up x`` run once for all experts, each expert adds only its low-rank terms and
its activation, and because ``sum_e g_e W_down h_e = W_down (sum_e g_e h_e)`` the frozen output projection runs once
on the gated mix. Per token only its k selected experts are computed, so the activation memory grows with k, not E.

Shapes: ``N`` tokens, ``D`` model width, ``F`` MLP width, ``E`` experts, ``k`` experts per token, ``r`` LoRA rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import SPARSE_BUCKET, LoRAMoELinear


@dataclass(frozen=True)
class MLPForm:
    """How one family's MLP block computes, so that its experts can be whole MLPs.

    Attributes:
        inputs: projections applied to the block input, in the order the nonlinearity reads them
            (``(gate, up)`` for a gated MLP, ``(fc,)`` for a plain one).
        output: the projection after the nonlinearity.
        activation: attribute of the HF MLP module holding the activation function.
        dropout: attribute of the HF MLP module holding the output dropout (``None``: none).
    """

    inputs: tuple[str, ...]
    output: str
    activation: str
    dropout: str | None = None

    @property
    def gated(self) -> bool:
        return len(self.inputs) == 2


GPT2_MLP = MLPForm(("c_fc",), "c_proj", "act", "dropout")
LLAMA_MLP = MLPForm(("gate_proj", "up_proj"), "down_proj", "act_fn")


class ExpertMLPs:
    """The computation of a block whose experts are whole MLPs; it holds no parameters of its own.

    The block's projections stay where they are in the HF module (so parameter names, roles and adapter files
    are those of the projection form); this object reads their frozen base layers and expert LoRAs.
    """

    def __init__(self, mlp: nn.Module, form: MLPForm) -> None:
        self.form = form
        self.mlp = mlp  # owned by the RoutedMLP (this object is no module)
        self.act: Callable[[torch.Tensor], torch.Tensor] = getattr(mlp, form.activation)
        self.dropout: nn.Module | None = getattr(mlp, form.dropout) if form.dropout else None

    def _projection(self, name: str) -> LoRAMoELinear:
        return self.mlp.get_submodule(name)

    def _hidden(self, pre: list[torch.Tensor]) -> torch.Tensor:
        """The nonlinearity on the input projections' outputs: (N, F) each -> (N, F)."""
        return hidden(self.act, self.form.gated, pre)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Mix the selected experts' MLP outputs.

        Args:
            x: (B, T, D) block input.
            weights: (B, T, k) gate of each selected expert (rows sum to 1).
            indices: (B, T, k) the selected experts.

        Returns:
            (B, T, D) the block output.
        """
        shape = x.shape
        flat_x = x.reshape(-1, shape[-1])  # (N, D)
        flat_w = weights.reshape(-1, weights.shape[-1])  # (N, k)
        flat_i = indices.reshape(-1, indices.shape[-1])  # (N, k)
        inputs = [self._projection(n) for n in self.form.inputs]
        output = self._projection(self.form.output)
        # The frozen projections run on (B, T, .) as in the HF block: in an ONNX graph they stay MatMul nodes, which
        # export/onnx.py's int4 pass quantises (on (N, .) they become Gemm). One view of flat_x per projection keeps
        # flat_x's gradient summing the same terms in the same order as on (N, D).
        base_pre = [p.base(flat_x.view(shape)).flatten(0, -2) for p in inputs]  # input projections, once: (N, F) each
        # sparse: each expert on its routed tokens (data-dependent shapes); dense: k masked slots (fixed shapes)
        mix_fn = self._sparse_mix if output.sparse else self._slot_mix
        h_mix, low = mix_fn(flat_x, flat_w, flat_i, inputs, output, base_pre)  # (N, F), (N, E*r)
        base_out = output.base(h_mix.view(*shape[:-1], -1)).flatten(0, -2)  # frozen output projection, once: (N, D)
        out = _plus_low_rank(base_out, low, output.lora_b_cat()).view(*shape[:-1], -1)  # (B, T, D)
        if self.dropout is not None:
            out = self.dropout(out)
        return out

    def every_expert(self, x: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
        """The export form: every expert on every token, weighted by its dense gate (zero outside the top k).

        Each expert with its own LoRA weights: ops XNNPACK delegates, so a block lowers without partition breaks.
        Per token it computes all E experts instead of k (an exported program runs one token per decode step, where
        the frozen weights dominate).

        Args:
            x: (B, T, D) block input.
            columns: E gates (B, T, 1), one per expert.

        Returns:
            (B, T, D) the block output.
        """
        inputs = [self._projection(n) for n in self.form.inputs]
        output = self._projection(self.form.output)
        base_pre = [p.base(x) for p in inputs]  # (B, T, F) each, once
        h_mix, low = None, None
        for e, gate in enumerate(columns):
            g = gate.to(x.dtype)  # (B, T, 1)
            h = self._hidden([b + p.scale * p.experts[e](x) for b, p in zip(base_pre, inputs)])  # (B, T, F)
            h_mix = h * g if h_mix is None else h_mix + h * g
            y = output.experts[e](h) * g  # (B, T, D)
            low = y if low is None else low + y
        out = output.base(h_mix) + output.scale * low
        return self.dropout(out) if self.dropout is not None else out

    def _slot_mix(self, x, weights, indices, inputs, output, base_pre) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed shapes: :func:`slot_mix` on this block's LoRA weights."""
        return slot_mix(self.act, self.form.gated, x, weights, indices, base_pre, [p.lora_a_cat() for p in inputs],
                        [p.lora_b_cat() for p in inputs], [p.scale for p in inputs], output.lora_a_cat(),
                        output.scale, output.n_experts, output.rank)

    def _sparse_mix(self, x, weights, indices, inputs, output, base_pre) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert on the tokens routed to it (counts padded to multiples of SPARSE_BUCKET with zero weight).
        Returns what :meth:`_slot_mix` returns."""
        h_mix = torch.zeros_like(base_pre[0])  # (N, F)
        # per expert: (N, r) its gated, scaled low-rank activations of the output projection (zero where not routed)
        columns = [x.new_zeros(x.shape[0], output.rank, dtype=weights.dtype) for _ in range(output.n_experts)]
        for e in range(output.n_experts):
            hit = indices == e  # (N, k)
            tokens = hit.any(dim=-1).nonzero().squeeze(-1)  # (N_e,)
            if tokens.numel() == 0:
                continue
            w = (weights * hit).sum(dim=-1, keepdim=True).index_select(0, tokens)  # (N_e, 1)
            pad = -tokens.numel() % SPARSE_BUCKET
            if pad:
                tokens = torch.cat([tokens, tokens.new_zeros(pad)])
                w = torch.cat([w, w.new_zeros(pad, 1)])
            xe = x.index_select(0, tokens)
            pre = [_plus_low_rank(b.index_select(0, tokens), F.linear(xe, p.experts[e].lora_A) * p.scale,
                                  p.experts[e].lora_B) for b, p in zip(base_pre, inputs)]
            h = self._hidden(pre)  # (N_e, F)
            h_mix = h_mix.index_add(0, tokens, (h * w.to(h.dtype)).to(h_mix.dtype))
            low = F.linear(h, output.experts[e].lora_A) * (w * output.scale)  # (N_e, r)
            columns[e] = columns[e].index_add(0, tokens, low.to(columns[e].dtype))
        return h_mix, torch.cat(columns, dim=-1)


def hidden(act: Callable[[torch.Tensor], torch.Tensor], gated: bool, pre: list[torch.Tensor]) -> torch.Tensor:
    """An expert's hidden state from its input projections' outputs: ``act(pre_0) * pre_1`` for a gated MLP,
    ``act(pre_0)`` for a plain one; (N, F) each -> (N, F)."""
    return act(pre[0]) * pre[1] if gated else act(pre[0])


def slot_mix(act: Callable[[torch.Tensor], torch.Tensor], gated: bool, x: torch.Tensor, weights: torch.Tensor,
             indices: torch.Tensor, base_pre: list[torch.Tensor], a_in: list[torch.Tensor], b_in: list[torch.Tensor],
             scales: list[float], a_out: torch.Tensor, out_scale: float, n_experts: int,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense mix with fixed shapes: slot j of every token runs the token's j-th expert, its low-rank terms
    selected by a one-hot mask over the experts' concatenated ranks.

    The LoRA scale and the gate ride on the (N, E, r) low-rank activations, so each input projection's update
    lands on its frozen term in one fused multiply-add and no (N, F) tensor is scaled on its own.

    Args:
        act: the MLP's activation; ``gated``: whether the hidden state is ``act(pre_0) * pre_1``.
        x: (N, D) block input; ``weights``, ``indices``: (N, k) gates and experts of each token's k slots.
        base_pre: the input projections' frozen outputs, (N, F) each.
        a_in, b_in, scales: per input projection, its experts' concatenated ``A`` (E*r, D) and ``B`` (F, E*r), and
            its LoRA scale.
        a_out, out_scale: the output projection's concatenated ``A`` (E*r, F) and LoRA scale.

    Returns:
        ``(sum_j w_j h_j, sum_j w_j s onehot_j A^out h_j)``: the gated hidden mix (N, F) and the output projection's
        gated, scaled low-rank activations (N, E*r).
    """
    experts = torch.arange(n_experts, device=x.device)
    low_in = [F.linear(x, a).unflatten(-1, (n_experts, rank)) for a in a_in]  # (N, E, r) each
    h_mix, low_out = None, None
    for j in range(indices.shape[-1]):
        onehot = (indices[:, j : j + 1] == experts).to(weights.dtype).unsqueeze(-1)  # (N, E, 1)
        pre = [_plus_low_rank(b, (a * (onehot * s)).flatten(-2), b_cat)
               for b, a, b_cat, s in zip(base_pre, low_in, b_in, scales)]
        h = hidden(act, gated, pre)  # (N, F): MLP_{i_j} before its output projection
        w = weights[:, j : j + 1]  # (N, 1)
        h_mix = h * w.to(h.dtype) if h_mix is None else torch.addcmul(h_mix, h, w.to(h.dtype))
        low = F.linear(h, a_out).unflatten(-1, (n_experts, rank))  # (N, E, r)
        term = low * (onehot * (w.unsqueeze(-1) * out_scale))
        low_out = term if low_out is None else low_out + term
    return h_mix, low_out.flatten(-2)


def _plus_low_rank(frozen: torch.Tensor, low: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``frozen + low @ lora_b.T`` as one fused multiply-add (``addmm``): (N, F), (N, R), (F, R) -> (N, F), in
    ``frozen``'s dtype (under autocast, the autocast dtype)."""
    return torch.addmm(frozen, low.to(frozen.dtype), lora_b.to(frozen.dtype).t())

__all__ = ["GPT2_MLP", "LLAMA_MLP", "ExpertMLPs", "MLPForm", "slot_mix"]
