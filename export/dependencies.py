"""Graph partitioning in memory linear-ish in the graph, not quadratic: a compact stand-in for the dependency viewer of
torch.fx's ``CapabilityBasedPartitioner`` and ExecuTorch's ``GroupBasedPartitioner`` (which XNNPACK uses).

Both partitioners build, for every node, a Python ``set`` of all nodes downstream of it (ExecuTorch's also of all
upstream ones), the transitive closure of the graph. A joint forward + backward graph is nearly a chain of layers
whose every forward node reaches most of the backward, so the closure holds about n^2 / 2 entries: SmolLM2's
training graph cut to 3 / 6 / 10 layers (2,167 / 4,237 / ~7,000 nodes) peaked at 1.0 / 2.1 / 4.7 GiB while
partitioning, and the full 30 layers were killed at 22 GiB (see docs/results.md, issue 14).

:class:`CompactDependencies` keeps the same closure as one bit row per node (n^2 / 8 bytes: 55 MB for 21,000 nodes)
and answers ``downstreams_of`` with the same nodes. :func:`compact_dependencies` installs it for the duration of a
lowering; the partitions are the same (tested against the stock viewer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

#: (module, attribute) of every dependency viewer the partitioners look up when they are built.
_VIEWERS = (
    ("torch.fx.passes.infra.partitioner", "_DependencyViewer"),
    ("executorch.exir.backend.canonical_partitioners.group_partitioner", "_DependencyViewer"),
)


class CompactDependencies:
    """Transitive downstream and upstream nodes of every node of ``graph_module``, as packed bit rows.

    Shape: ``(n, ceil(n / 64))`` uint64 per direction for ``n`` nodes; bit ``j`` of row ``i`` says node ``j`` (in
    graph order) depends on node ``i`` (downstream) or node ``i`` on node ``j`` (upstream). The upstream rows are
    built on first use (the partitioners ask only for downstream nodes).
    """

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self._nodes = list(graph_module.graph.nodes)
        self._index = {node: i for i, node in enumerate(self._nodes)}
        self._down = self._closure(lambda node: node.users, reverse=True)
        self._up: np.ndarray | None = None

    def _closure(self, edges, reverse: bool) -> np.ndarray:
        """Rows of reachable nodes along ``edges`` (users or inputs), filled in an order where every edge's
        target row is complete before it is read (the graph is topologically ordered)."""
        n = len(self._nodes)
        rows = np.zeros((n, (n + 63) // 64), dtype=np.uint64)
        order = range(n - 1, -1, -1) if reverse else range(n)
        for i in order:
            row = rows[i]
            for other in edges(self._nodes[i]):
                j = self._index.get(other)
                if j is None:  # a node outside this graph (not expected): the stock viewer ignores it too
                    continue
                row |= rows[j]
                row[j >> 6] |= np.uint64(1 << (j & 63))
        return rows

    def _members(self, rows: np.ndarray, node: torch.fx.Node) -> list[torch.fx.Node]:
        i = self._index.get(node)
        if i is None:  # the stock viewer is a defaultdict: an unknown node has no dependencies
            return []
        bits = np.unpackbits(rows[i].view(np.uint8), bitorder="little")[: len(self._nodes)]
        return [self._nodes[j] for j in np.flatnonzero(bits)]

    def downstreams_of(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Every node that (transitively) uses ``node``'s output, in graph order."""
        return self._members(self._down, node)

    def upstreams_of(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Every node whose output ``node`` (transitively) reads, in graph order."""
        if self._up is None:
            self._up = self._closure(lambda node: node.all_input_nodes, reverse=False)
        return self._members(self._up, node)


@contextlib.contextmanager
def compact_dependencies() -> Iterator[None]:
    """Build the partitioners' dependency viewers as :class:`CompactDependencies` inside the block (a lowering).

    Raises:
        ImportError: if a partitioner module is missing (the pinned torch / executorch versions have both).
    """
    import importlib

    saved = []
    try:
        for module_name, attribute in _VIEWERS:
            module = importlib.import_module(module_name)
            saved.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, CompactDependencies)
        yield
    finally:
        for module, attribute, original in saved:
            setattr(module, attribute, original)


__all__ = ["CompactDependencies", "compact_dependencies"]
