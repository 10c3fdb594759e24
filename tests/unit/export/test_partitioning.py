"""export.partitioning: the compact dependency viewer answers as the stock ones, XNNPACK's partitions (stock viewer and
merge loop against the compact ones) are the same on a small branchy graph and on a tiny Llama's joint training
graph, and the stock viewers and merge loop are back after the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.passes.infra import partitioner as fx_partitioner

from export.partitioning import CompactDependencies, fast_partitioning


class Branchy(nn.Module):
    """Diamonds, a skip connection, an unused branch and an op XNNPACK does not take (cumsum) in the middle, so
    that the graph splits into several partitions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        left, right = self.b(h), self.c(h) * 2
        unused = left.cumsum(dim=-1)  # noqa: F841  (dead code is removed by export)
        mid = (left + right).cumsum(dim=-1)
        return self.c(mid) + h


def graph_module() -> torch.fx.GraphModule:
    return torch.export.export(Branchy().eval(), (torch.randn(2, 8),)).graph_module


def test_the_compact_viewer_answers_as_the_stock_one_for_every_node():
    gm = graph_module()
    stock, compact = fx_partitioner._DependencyViewer(gm), CompactDependencies(gm)
    nodes = list(gm.graph.nodes)
    for node in nodes:
        down = compact.downstreams_of(node)
        assert set(down) == stock.downstreams_of(node)
        assert down == [n for n in nodes if n in set(down)]  # in graph order, no duplicates
        expected_up = {n for n in nodes if node in stock.downstreams_of(n)}
        assert set(compact.upstreams_of(node)) == expected_up
    placeholder, output = nodes[0], nodes[-1]
    assert output in compact.downstreams_of(placeholder) and compact.downstreams_of(output) == []
    assert compact.downstreams_of(torch.fx.Graph().placeholder("elsewhere")) == []


def partition_tags(program: torch.export.ExportedProgram) -> list[tuple[str, str]]:
    """``(node name, delegation tag)`` of every node after XNNPACK's partitioner (as the training export runs it)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    for node in program.graph.nodes:
        node.meta.pop("delegation_tag", None)
    result = XnnpackPartitioner(force_fp32_dynamic_linear=True).partition(program)
    return [(n.name, n.meta.get("delegation_tag", "")) for n in result.tagged_exported_program.graph.nodes]


def branchy_program() -> torch.export.ExportedProgram:
    from executorch.exir import to_edge

    return to_edge(torch.export.export(Branchy().eval(), (torch.randn(2, 8),))).exported_program()


def training_program() -> torch.export.ExportedProgram:
    """The edge form of a tiny Llama 1G2S's joint training graph (export/train_program.py's capture)."""
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from device_sdk.backends.executorch import program_parameters
    from device_sdk.config import TrainConfig
    from export.train_program import TrainingObjective, _dense_routing, rewrite_for_training

    from ...conftest import make_model

    model = make_model("tiny-llama", n_specialists=2)
    trained = program_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    model.eval()
    _dense_routing(model)
    example = (torch.zeros(2, 16, dtype=torch.long),) * 2
    with sdpa_kernel([SDPBackend.MATH]):
        joint = _export_forward_backward(torch.export.export(
            TrainingObjective(model, TrainConfig(precision="fp32", device="cpu")), example, strict=False))
    rewrite_for_training(joint.graph_module)
    return to_edge(joint).exported_program()


@pytest.mark.parametrize("make_program", [branchy_program, training_program], ids=["branchy", "training"])
def test_xnnpack_partitions_are_the_same_and_the_stock_parts_come_back(make_program):
    from executorch.exir import lowered_backend_module
    from executorch.exir.backend.canonical_partitioners import group_partitioner

    def stock_parts():
        return (fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer,
                group_partitioner.GroupBasedPartitioner._merge_partitions, lowered_backend_module.legalize_graph)

    program = make_program()
    before = stock_parts()
    reference = partition_tags(program)
    with fast_partitioning():
        assert fx_partitioner._DependencyViewer is CompactDependencies
        assert group_partitioner._DependencyViewer is CompactDependencies
        assert all(now is not then for now, then in zip(stock_parts()[2:], before[2:]))
        compact = partition_tags(program)
    assert compact == reference
    assert len({tag for _, tag in reference if tag}) >= 2  # the graph does split
    assert stock_parts() == before


def test_a_program_lowered_with_fast_partitioning_computes_as_eager():
    """The in-place re-sort replaces legalize_graph when each partition is cut out; the program still runs right."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(2, 8)
    with fast_partitioning():
        lowered = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
    assert sum(1 for n in lowered.exported_program().graph.nodes if "call_delegate" in str(n.target)) >= 2
    method = Runtime.get().load_program(lowered.to_executorch().buffer).load_method("forward")
    with torch.no_grad():
        torch.testing.assert_close(method.execute([x])[0], model(x), atol=1e-5, rtol=1e-5)
