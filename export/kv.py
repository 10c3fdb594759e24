"""KV-cache forms of a personalised Llama-family model (SmolLM2): prefill of a dynamic number of tokens and decode
of one token over a static cache of ``max_seq`` positions, routers and top-k gating inside the graph.

The decoder layers' own modules run unchanged (LoRA attention projections, RMSNorms, the routed LoRA-MoE MLP);
only the attention core is written here, because it reads and writes the cache:

* :class:`KVCacheLM` keeps the cache as module buffers of shape (1, S, H_kv, d) and runs attention with the
  kernels of ExecuTorch's own LLM export (``llama::update_cache`` writes the T new keys and values in place,
  ``llama::custom_sdpa`` attends causally over positions ``0 .. input_pos + T - 1`` only, with grouped query
  heads). ExecuTorch plans the buffers as mutable state that persists between calls. A decode step thus reads the
  filled part of the cache, not all ``max_seq`` positions (a masked product over the whole cache cost 5x the stock
  program's attention at short contexts). A phone runtime must link the custom-ops kernels, as ExecuTorch's LLM
  runner does.
* :class:`FunctionalKVLM` takes the cache as inputs and returns the updated cache (ONNX: ``past_key.i`` /
  ``past_value.i`` in, ``present_key.i`` / ``present_value.i`` out), with a masked product over the whole cache
  that groups the query heads by their key/value head instead of repeating the cache (GQA): with ``G = H / H_kv``
  the queries of one KV head form a (G*T, d) block.

Both return the logits of the last position only (generation needs nothing else; the output projection over a
49k vocabulary would otherwise cost as much as a layer per prompt token).

Shapes: ``T`` new tokens, ``S = max_seq`` cache positions, ``H`` query heads, ``H_kv`` key/value heads, ``d`` head
width, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import torch
from torch import nn

from device_sdk.lora import constant_weight

from .errors import ExportError


def _llama_parts(model: nn.Module) -> nn.Module:
    """The inner ``LlamaModel`` of a Llama-family causal LM, or a clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head") \
            or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in layers):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ExportError(f"KV-cache programs support the Llama family (SmolLM2, tiny-llama); this model is "
                          f"{kind!r}. Export it without --kv-cache")
    return inner


def cache_shape(model: nn.Module, max_seq: int) -> tuple[int, int, int, int]:
    """``(1, H_kv, S, d)``: the shape of one layer's key (or value) cache in the ONNX form (the ExecuTorch buffers
    are (1, S, H_kv, d))."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1, cfg.num_key_value_heads, max_seq, head_dim


class _KVBase(nn.Module):
    """The shared forward; subclasses say where the cache lives (``self.model`` is the HF causal LM, so that
    parameter names are those of :class:`export.load.LogitsModel`)."""

    def __init__(self, model: nn.Module, max_seq: int) -> None:
        super().__init__()
        if max_seq < 2:
            raise ExportError(f"max_seq must be at least 2, got {max_seq}")
        _llama_parts(model)
        self.model = model
        self.max_seq = max_seq
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cache_shape(model, max_seq)[-1]
        # constants of the delegable norm and rotary forms, used as linear weights: frozen parameters, not buffers
        # (XNNPACK miscomputes a linear whose weight is a buffer; see device_sdk.lora.constant_weight)
        self._mean_row = constant_weight(torch.full((1, cfg.hidden_size), 1.0 / cfg.hidden_size))
        half = self.head_dim // 2
        rotate = torch.zeros(self.head_dim, self.head_dim)  # rotate_half(x) = x @ rotate.T = cat(-x2, x1)
        rotate[torch.arange(half), torch.arange(half) + half] = -1.0
        rotate[torch.arange(half) + half, torch.arange(half)] = 1.0
        self._rotate_half = constant_weight(rotate)  # (d, d)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """HF's ``LlamaRMSNorm`` with the mean of squares as a product with a constant ``1/D`` row: (1, T, D) ->
        (1, T, D). XNNPACK averages only over the last two dims of 4-D tensors; a linear it delegates."""
        mean_sq = torch.nn.functional.linear(x * x, self._mean_row)  # (1, T, 1)
        return norm.weight * (x * torch.rsqrt(mean_sq + norm.variance_epsilon))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of (1, T, heads, d) with cos, sin (1, T, 1, d); HF's ``rotate_half`` as a product with
        a constant signed permutation (exact: one nonzero term per output), which XNNPACK delegates (slices of a
        dynamic number of tokens it does not)."""
        return x * cos + torch.nn.functional.linear(x, self._rotate_half) * sin

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                   step) -> torch.Tensor:
        """One layer's attention over the cache: (1, T, D) -> (1, T, D); writes the T new keys and values.

        Shapes are written with one inferred (-1) dimension and no symbolic size, so that XNNPACK delegates the
        reshapes (it refuses symbolic ones).
        """
        d = self.head_dim
        fused = getattr(attn, "lora_fused", None)  # export.fused.FusedAttentionLoRA
        if fused is None:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:
            q, k, v = fused.qkv(x, attn.q_proj, attn.k_proj, attn.v_proj)
        q = self._rotate(q.view(1, -1, self.n_heads, d), cos, sin)  # (1, T, H, d)
        k = self._rotate(k.view(1, -1, self.n_kv, d), cos, sin)  # (1, T, H_kv, d)
        v = v.view(1, -1, self.n_kv, d)  # (1, T, H_kv, d)
        out = self._attend(layer, step, q, k, v, attn.scaling).reshape(1, -1, self.n_heads * d)  # (1, T, H*d)
        return attn.o_proj(out) if fused is None else fused.o(out, attn.o_proj)  # (1, T, D)

    def _step(self, input_pos: torch.Tensor, positions: torch.Tensor):
        """What every layer's :meth:`_attend` of one call needs to know about the positions of its T tokens
        (``input_pos`` (1,), ``positions`` (T,) = ``input_pos + 0..T-1``)."""
        raise NotImplementedError

    def _attend(self, layer: int, step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        """Write the new keys and values k, v (1, T, H_kv, d) of ``layer`` and attend with q (1, T, H, d) over the
        cache up to each query's position: -> (1, T, H, d)."""
        raise NotImplementedError

    def _logits(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """(1, T) tokens at positions ``input_pos[0] + 0..T-1`` -> (1, 1, V) logits of the last one."""
        inner = self.model.model
        t = input_ids.shape[1]
        positions = input_pos + torch.arange(t, dtype=torch.long)  # (T,)
        h = inner.embed_tokens(input_ids)  # (1, T, D)
        cos, sin = (c.view(1, -1, 1, self.head_dim) for c in inner.rotary_emb(h, positions[None]))  # (1, T, 1, d)
        step = self._step(input_pos, positions)
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(layer.self_attn, self._norm(layer.input_layernorm, h), cos, sin, i, step)
            h = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
        return self.model.lm_head(self._norm(inner.norm, h[:, -1:]))  # (1, 1, V)


def _load_llm_kernels() -> None:
    """Register ExecuTorch's LLM attention and cache ops (``torch.ops.llama.*``: eager kernels and export shapes)."""
    try:
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except (ImportError, OSError, AssertionError) as err:
        raise ExportError(f"ExecuTorch's LLM kernels (executorch.extension.llm.custom_ops) did not load: {err}. "
                          "Reinstall the pinned executorch (make setup)") from err


class KVCacheLM(_KVBase):
    """``(input_ids (1, T) int64, input_pos (1,) int64) -> logits (1, 1, V)``, cache in buffers (ExecuTorch).

    ``input_pos`` is the position of the first of the T tokens; the caller keeps ``input_pos + T <= max_seq``.
    A prefill is one call at position 0, each decode step a call with T = 1 at the next position.
    """

    def __init__(self, model: nn.Module, max_seq: int) -> None:
        super().__init__(model, max_seq)
        _load_llm_kernels()
        shape = (1, max_seq, self.n_kv, self.head_dim)  # the layout of llama::update_cache and custom_sdpa
        for i in range(self.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def _step(self, input_pos, positions):
        start = input_pos[0].item()  # a symbolic size in the exported graph, as in ExecuTorch's own LLM export
        torch._check_is_size(start)
        torch._check(start < self.max_seq)
        return start

    def _attend(self, layer, step, q, k, v, scale):
        keys, values = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        torch.ops.llama.update_cache(k, keys, step)
        torch.ops.llama.update_cache(v, values, step)
        return torch.ops.llama.custom_sdpa(q, keys, values, step, None, 0.0, True, scale)

    def reset(self) -> None:
        """Zero the cache (not needed between generations: positions past ``input_pos`` are never read)."""
        for name, buf in self.named_buffers():
            if "_cache_" in name:
                buf.zero_()

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self._logits(input_ids, input_pos)


class FunctionalKVLM(_KVBase):
    """``(input_ids (1, T), input_pos (1,), [k_0, v_0, ..., k_{L-1}, v_{L-1}]) -> (logits (1, 1, V), k_0', v_0', ...)``
    with every cache tensor (1, H_kv, S, d): the cache passes through as inputs and outputs (ONNX)."""

    def __init__(self, model: nn.Module, max_seq: int) -> None:
        super().__init__(model, max_seq)
        self._past: list[torch.Tensor] = []
        self._present: list[torch.Tensor] = []

    def _step(self, input_pos, positions):
        seen = torch.arange(self.max_seq, dtype=torch.long)[None, :] <= positions[:, None]  # (T, S)
        g = self.n_heads // self.n_kv
        mask = torch.where(seen, 0.0, float("-inf")).repeat(g, 1)  # (G*T, S): rows as in the grouped queries
        return positions, mask

    def _attend(self, layer, step, q, k, v, scale):
        positions, mask = step
        d, g = self.head_dim, self.n_heads // self.n_kv
        keys = self._past[2 * layer].index_copy(2, positions, k.transpose(1, 2))  # (1, H_kv, S, d)
        values = self._past[2 * layer + 1].index_copy(2, positions, v.transpose(1, 2))
        self._present += [keys, values]
        # query head h reads KV head h // G (HF's repeat_kv): group the G heads of each KV head as rows
        q = q.permute(0, 2, 1, 3).reshape(self.n_kv, -1, d)  # (H_kv, G*T, d)
        scores = torch.bmm(q, keys[0].transpose(1, 2)) * scale + mask  # (H_kv, G*T, S)
        out = torch.bmm(torch.softmax(scores, dim=-1), values[0])  # (H_kv, G*T, d)
        return out.view(self.n_kv, g, -1, d).permute(2, 0, 1, 3)  # (T, H_kv, G, d) = (1, T, H, d) in memory order

    def empty_cache(self) -> list[torch.Tensor]:
        """``2 L`` zero tensors (1, H_kv, S, d): the cache before the first call."""
        return [torch.zeros(cache_shape(self.model, self.max_seq)) for _ in range(2 * self.n_layers)]

    def cache_names(self, prefix: str) -> list[str]:
        """``[f"{prefix}_key.0", f"{prefix}_value.0", ...]``, in argument order."""
        return [f"{prefix}_{kind}.{i}" for i in range(self.n_layers) for kind in ("key", "value")]

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: list[torch.Tensor]):
        if len(cache) != 2 * self.n_layers:
            raise ExportError(f"expected {2 * self.n_layers} cache tensors (key and value per layer), got {len(cache)}")
        self._past, self._present = list(cache), []
        try:
            logits = self._logits(input_ids, input_pos)
            return (logits, *self._present)
        finally:
            self._past, self._present = [], []
