"""export.dependencies: the compact dependency viewer answers as the stock ones and leaves XNNPACK's partitions
unchanged, and the stock viewers are back after the block."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.infra import partitioner as fx_partitioner

from export.dependencies import CompactDependencies, compact_dependencies


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


def test_xnnpack_partitions_are_the_same_and_the_stock_viewers_come_back():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge
    from executorch.exir.backend.canonical_partitioners import group_partitioner

    def tags() -> list[tuple[str, str]]:
        program = to_edge(torch.export.export(Branchy().eval(), (torch.randn(2, 8),))).exported_program()
        result = XnnpackPartitioner().partition(program)
        return [(n.name, n.meta.get("delegation_tag", "")) for n in result.tagged_exported_program.graph.nodes]

    stock_viewers = (fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer)
    reference = tags()
    with compact_dependencies():
        assert fx_partitioner._DependencyViewer is CompactDependencies
        assert group_partitioner._DependencyViewer is CompactDependencies
        compact = tags()
    assert compact == reference
    assert len({tag for _, tag in reference if tag}) >= 2  # the test graph does split
    assert (fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer) == stock_viewers
