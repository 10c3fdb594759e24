"""export.lean_passes: programs lowered inside the block are byte-identical to stock ones (fp32 and 8da4w, with the
Q4_1 block offsets), re-traces of unchanged graphs are skipped, a changed graph or a pass that works through the
re-trace is re-traced, and the stock ``call`` is back after the block."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from export.lean_passes import fingerprint, lean_passes
from export.quantize import quantize_program


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


class TinyLM(nn.Module):
    """Embedding, two ``.base`` projections with a residual and a norm, an ``lm_head``: what quantize_program
    quantises (int4 blocks on the bases, int8 on the head and the embedding)."""

    def __init__(self, vocab: int = 50, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up, self.down = Block(width), Block(width)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.nn.functional.silu(self.up(h)))
        return self.lm_head(self.norm(h))


def lower(model: nn.Module, ids: torch.Tensor, lean: bool, quantized: bool) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    exported = torch.export.export(model, (ids,))
    with lean_passes() if lean else contextlib.nullcontext():
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=quantized)).buffer


@pytest.mark.parametrize("scheme", [None, "8da4w"])
def test_lean_lowering_writes_the_stock_program_and_skips_retraces(scheme):
    import executorch.kernels.quantized  # noqa: F401  (the quantized ops' out variants)
    from executorch.exir.pass_base import _ExportPassBase

    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 50, (1, 6))
    if scheme:
        model, _ = quantize_program(model, scheme)
    stock_call = _ExportPassBase.call
    counts = {"calls": 0, "retraces": 0}

    def counting_stock(self, graph_module):
        counts["retraces"] += 1
        return stock_call(self, graph_module)

    _ExportPassBase.call = counting_stock  # lean_passes wraps whatever call it finds
    try:
        reference = lower(model, ids, lean=False, quantized=bool(scheme))
        stock_retraces, counts["retraces"] = counts["retraces"], 0
        lean = lower(model, ids, lean=True, quantized=bool(scheme))
    finally:
        _ExportPassBase.call = stock_call
    assert lean == reference
    assert 0 < counts["retraces"] < stock_retraces  # some re-traces were skipped, not all


class AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def traced() -> torch.fx.GraphModule:
    return torch.export.export(AddOne(), (torch.randn(3),)).graph_module


def test_the_fingerprint_follows_every_change_of_a_node():
    gm = traced()
    before = fingerprint(gm)
    assert fingerprint(traced()) == before  # the same graph traced again
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    add.args = (add.args[0], 2)
    assert fingerprint(gm) != before
    add.args = (add.args[0], 1)
    assert fingerprint(gm) == before
    add.target = torch.ops.aten.mul.Tensor
    assert fingerprint(gm) != before


def test_changed_graphs_and_passes_that_work_in_the_retrace_are_retraced():
    from executorch.exir.pass_base import ExportPass, _ExportPassBase

    retraced = []

    class Plain(ExportPass):
        def call(self, graph_module):
            retraced.append(type(self).__name__)
            return super().call(graph_module)

    class Rewriting(Plain):
        def call_operator(self, op, args, kwargs, meta):  # its work happens during the re-trace
            return super().call_operator(op, args, kwargs, meta)

    stock = _ExportPassBase.call
    exported = torch.export.export(AddOne(), (torch.randn(3),))
    with lean_passes():
        gm = Plain()(exported.graph_module).graph_module  # first sight: re-traced and marked
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert Plain()(gm).modified is False  # unchanged: returned as it is
        assert Rewriting()(gm).modified is True
        calls[0].args = (calls[0].args[0], 5)  # changed in place, as a pass does before super().call
        assert Plain()(gm).modified is True
    assert _ExportPassBase.call is stock
    assert retraced == ["Plain", "Plain", "Rewriting", "Plain"]  # each pass ran; only the re-traces were skipped
