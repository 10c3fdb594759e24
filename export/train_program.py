"""ExecuTorch TRAINING program of a device's LoRA-MoE model: the SDK's bi-level objective, forward and backward.

One method, ``forward(x, y)`` with ``x, y`` (B, T) int64, returns ``(total, lm, lb)`` (the objective of
:func:`device_sdk.train.objective`: LM loss + lambda * load-balancing loss, fp32) followed by the gradient of
``total`` with respect to every adapter tensor (attention LoRA, generalists, specialists, routers). The frozen base
is inside the program (constants, packed by XNNPACK); the adapter tensors live in ``trainable.ptd``, one entry per
tensor keyed by ``model.<parameter name>``, and are the program's mutable weights.

Both halves of the bi-level update run through the same method: an expert step applies only the expert gradients
of a training batch, a router step only the router gradients of a validation batch (the backend,
:mod:`device_sdk.backends.executorch`, sets ``.grad`` of exactly one group). The gradient with respect to one
group does not depend on whether the other group is trainable, so each step equals the PyTorch backend's; the
router gradients of a training batch (and the expert gradients of a validation batch) are computed and dropped,
which costs a few rank-r matmuls per layer.

Export follows the traps measured in ``shared/notes/stack.md``: MATH attention while tracing and building the
joint graph, ``aten.addmm`` rewritten to ``mm + add`` (a naive kernel is 10x slower) and ``aten.empty_permuted``
to ``empty + permute`` (Llama fails ``to_edge`` without it), XNNPACK with ``force_fp32_dynamic_linear`` and
``external_mutable_weights``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from device_sdk.backends.executorch import (
    META,
    PROGRAM,
    TRAINABLE_DATA,
    TrainProgramMeta,
    base_fingerprint,
    program_parameters,
)
from device_sdk.config import TrainConfig
from device_sdk.fileio import atomic_write_bytes
from device_sdk.inject import adapter_config
from device_sdk.lora import LoRAMoELinear
from device_sdk.train import objective

from .errors import ExportError, exporter_failures
from .lean_passes import lean_passes
from .partitioning import fast_partitioning

log = logging.getLogger(__name__)

#: Name of the wrapped model inside :class:`TrainingObjective` (the prefix of every key in the data file).
PREFIX = "model."


class TrainingObjective(nn.Module):
    """``(x, y) -> (total, lm, lb)``: the graph that is exported and differentiated (the loss first)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64 -> three fp32 scalars; ``lm`` and ``lb`` are reported, not differentiated."""
        total, lm, lb = objective(self.model, x, y, self.cfg)
        return total, lm.detach(), lb.detach()


def rewrite_for_training(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rewrite ops of a joint graph that ExecuTorch runs slowly or not at all (in place).

    ``aten.addmm(bias, a, b)`` -> ``mm(a, b) + bias`` (the portable addmm kernel is naive);
    ``aten.empty_permuted(size, layout)`` -> ``empty(size permuted) . permute(inverse)`` (no edge op);
    every ``aten.mm(a, b)`` -> ``bmm`` of one batch with static views, which XNNPACK delegates (the partitioner
    left the joint graph's ``mm`` nodes, such as the backward's products of two computed tensors, to the portable
    ``mm`` kernel, a naive loop).

    Returns:
        ``{"addmm": n, "empty_permuted": m, "mm": k}`` rewrite counts.
    """
    graph, counts = gm.graph, {"addmm": 0, "empty_permuted": 0, "mm": 0}
    for node in list(graph.nodes):
        if node.target == torch.ops.aten.addmm.default:
            bias, a, b = node.args[:3]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            with graph.inserting_before(node):
                created = [graph.call_function(torch.ops.aten.mm.default, (a, b))]
                if alpha != 1:
                    created.append(graph.call_function(torch.ops.aten.mul.Scalar, (created[-1], alpha)))
                if beta != 1:
                    bias = graph.call_function(torch.ops.aten.mul.Scalar, (bias, beta))
                    bias.meta = dict(bias.args[0].meta)
                created.append(graph.call_function(torch.ops.aten.add.Tensor, (created[-1], bias)))
            for step in created:  # each has the result's shape and dtype
                step.meta = dict(node.meta)
            new = created[-1]
            counts["addmm"] += 1
        elif node.target == torch.ops.aten.empty_permuted.default:
            size, layout = node.args[:2]
            inverse = [list(layout).index(i) for i in range(len(layout))]
            with graph.inserting_before(node):
                empty = graph.call_function(torch.ops.aten.empty.memory_format, ([size[p] for p in layout],),
                                            dict(node.kwargs))
                new = graph.call_function(torch.ops.aten.permute.default, (empty, inverse))
            new.meta = dict(node.meta)
            empty.meta = {**node.meta, "val": node.meta["val"].permute(list(layout))} if "val" in node.meta \
                else dict(node.meta)
            counts["empty_permuted"] += 1
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.target == torch.ops.aten.mm.default:
            node.replace_all_uses_with(_as_bmm(graph, node))
            graph.erase_node(node)
            counts["mm"] += 1
    graph.lint()
    gm.recompile()
    return counts


def _as_bmm(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """``mm(a, b)`` as ``bmm`` of a batch of one, with static views (which XNNPACK delegates, unlike squeeze and
    unsqueeze): (M, K) x (K, N) -> (M, N); returns the replacement node."""
    a, b = node.args[:2]
    val = node.meta["val"]
    with graph.inserting_before(node):
        batched = [graph.call_function(torch.ops.aten.view.default, (x, [1, *x.meta["val"].shape])) for x in (a, b)]
        product = graph.call_function(torch.ops.aten.bmm.default, tuple(batched))
        out = graph.call_function(torch.ops.aten.view.default, (product, list(val.shape)))
    for new, x in zip(batched, (a, b)):
        new.meta = {**x.meta, "val": x.meta["val"].unsqueeze(0)}
    product.meta = {**node.meta, "val": val.unsqueeze(0)}
    out.meta = dict(node.meta)
    return out


def _dense_routing(model: nn.Module) -> list[tuple[LoRAMoELinear, bool]]:
    """Switch every mixture to dense routing (fixed shapes); returns what to restore."""
    saved = []
    for module in model.modules():
        if isinstance(module, LoRAMoELinear):
            saved.append((module, module.sparse))
            module.sparse = False
    return saved


def export_train_program(model: nn.Module, out: Path, batch_size: int, context: int, cfg: TrainConfig,
                         base_model: str, lower: bool = True) -> TrainProgramMeta:
    """Export ``model``'s training step to ``out/train.pte`` + ``out/trainable.ptd`` + ``out/train_program.json``.

    Args:
        model: a Hugging Face causal LM with adapters (:func:`device_sdk.inject.inject_adapters`), on the CPU; its
            current adapter values become the data file's.
        batch_size, context: the fixed (B, T) shape of the program's batches.
        cfg: the load-balancing settings (``lb_mode``, ``lb_weight``) of the objective; the program is fp32.
        base_model: the base model's name (recorded and checked when a backend loads the program).
        lower: lower to XNNPACK (``False``: portable kernels only; slower to run, faster to export).

    Returns:
        The program's metadata (also written to ``train_program.json``).

    Raises:
        ExportError: if tracing or lowering fails, or the model has no adapters.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = program_parameters(model)
    if not params:
        raise ExportError("the model has no adapter tensors to train; inject adapters first")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ExportError("export the training program from a model on the CPU")
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropouts:
        log.warning("the model has %d dropout layer(s) with p > 0; the training program runs without dropout",
                    len(dropouts))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = TrainConfig(precision="fp32", device="cpu", lb_mode=cfg.lb_mode, lb_weight=cfg.lb_weight)
    wrapper = TrainingObjective(model, fp32)
    example = (torch.zeros(batch_size, context, dtype=torch.long), torch.zeros(batch_size, context, dtype=torch.long))
    saved_routing = _dense_routing(model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    start = time.perf_counter()
    try:
        with exporter_failures("ExecuTorch training export"):
            for name, p in model.named_parameters():
                p.requires_grad_(name in params)
            model.eval()  # no dropout in the graph; the adapters behave the same in both modes
            with sdpa_kernel([SDPBackend.MATH]):  # a flash-attention backward op has no edge form
                program = torch.export.export(wrapper, example, strict=False)
                program = _export_forward_backward(program)
            counts = rewrite_for_training(program.graph_module)
            log.info("training graph captured in %.0f s (rewrote %s); lowering...", time.perf_counter() - start, counts)
            partitioner = [XnnpackPartitioner(force_fp32_dynamic_linear=True)] if lower else []
            # stock partitioning costs O(nodes^2) memory and time; most passes re-trace graphs they leave unchanged
            with fast_partitioning(), lean_passes():
                edge = to_edge_transform_and_lower(program, partitioner=partitioner)
                et = edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=True))
            data = {name: bytes(cord) for name, cord in et._tensor_data.items()}
    finally:
        for module, sparse in saved_routing:
            module.sparse = sparse
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        model.train(was_training)
    if len(data) != 1:
        raise ExportError(f"expected one data file of trainable tensors, the exporter wrote {sorted(data)}")
    (out / PROGRAM).write_bytes(et.buffer)
    atomic_write_bytes(out / TRAINABLE_DATA, next(iter(data.values())))
    adapter = adapter_config(model)
    meta = TrainProgramMeta(
        base_model=base_model, base_fingerprint=base_fingerprint(model), batch_size=batch_size, context=context,
        lb_mode=cfg.lb_mode, lb_weight=cfg.lb_weight, n_generalists=adapter.n_generalists,
        mixing=adapter.mixing, prefix=PREFIX,
        parameters={name: {"shape": list(p.shape), "role": role} for name, (p, role) in params.items()},
        seconds=round(time.perf_counter() - start, 1), lowered=lower, adapter=adapter.to_dict())
    (out / META).write_text(json.dumps(meta.to_dict(), indent=1))
    log.info("wrote %s (%.1f MB) and %s (%.1f MB) in %.0f s", PROGRAM, (out / PROGRAM).stat().st_size / 1e6,
             TRAINABLE_DATA, (out / TRAINABLE_DATA).stat().st_size / 1e6, meta.seconds)
    return meta


def export_train_checkpoint(checkpoint: Path, out: Path, batch_size: int, context: int,
                            cfg: TrainConfig | None = None, cache_dir: Path | None = None) -> TrainProgramMeta:
    """``python -m export --format pte-train``: the training program of a saved device (its base and adapters).

    Raises:
        ExportError: for a malformed checkpoint or a failed export.
    """
    from .load import load_personalized

    loaded = load_personalized(checkpoint, cache_dir=cache_dir)
    model = loaded.model.model
    for p in model.parameters():
        p.requires_grad_(False)
    for p, _ in program_parameters(model).values():
        p.requires_grad_(True)
    return export_train_program(model, out, batch_size, context, cfg or TrainConfig(device="cpu"),
                                loaded.base_model)
