"""Partitioning that scales with the graph: compact stand-ins for three steps of an XNNPACK lowering that cost
O(nodes^2) memory or O(partitions x nodes) time, which is what kept SmolLM2's joint training graph (about 21,000
nodes and 700 partitions) from lowering in 24 GiB (docs/results.md, issue 14).

Both partitioners build, for every node, a Python ``set`` of all nodes downstream of it (ExecuTorch's also of all
upstream ones), the transitive closure of the graph. A joint forward + backward graph is nearly a chain of layers
whose every forward node reaches most of the backward, so the closure holds about n^2 / 2 entries: SmolLM2's
training graph cut to 3 / 6 / 10 layers (2,167 / 4,237 / ~7,000 nodes) peaked at 1.0 / 2.1 / 4.7 GiB while
partitioning, and the full 30 layers were killed at 22 GiB (see docs/results.md, issue 14).

:class:`CompactDependencies` keeps the same closure as one bit row per node (n^2 / 8 bytes: 55 MB for 21,000 nodes)
and answers ``downstreams_of`` with the same nodes.

ExecuTorch's group partitioner then tries to merge every pair of its P initial partitions (one per matched op
group), each try building the union of both node sets and walking the external users' closures: 268,080 tries and
385 s for the 6-layer cut, growing as P^2 times the partition size. :func:`_merge_partitions` makes the same
decisions, pair by pair in the same order, with the closure as integer bit masks: a merge of ``p2`` into ``p1`` is
refused exactly when a node outside both, used by one of them, reaches back into either (the stock check, and what
its ``validate_partition`` walk re-checks on the unchanged graph).

Each partition is then cut out of the graph by ``create_submodule_from_nodes``, which re-sorts the whole graph
with ``legalize_graph``: a new graph of every node and a regenerated Python forward, once per partition. Here the
graph is re-sorted in place (:func:`_sort_in_place`): only the nodes that now come before an input move.

:func:`fast_partitioning` installs all three for the duration of a lowering; the partitions are the same (tested
against the stock partitioner) and the programs compute the same (the export tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


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
        self._reach: dict[torch.fx.Node, int] = {}

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

    def bit(self, node: torch.fx.Node) -> int:
        """``node`` as a one-bit mask (0 for a node outside the graph)."""
        i = self._index.get(node)
        return 0 if i is None else 1 << i

    def reach(self, node: torch.fx.Node) -> int:
        """``node`` and everything downstream of it as a bit mask (cached)."""
        mask = self._reach.get(node)
        if mask is None:
            i = self._index.get(node)
            mask = 0 if i is None else (1 << i) | int.from_bytes(self._down[i].tobytes(), "little")
            self._reach[node] = mask
        return mask

    def upstreams_of(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Every node whose output ``node`` (transitively) reads, in graph order."""
        if self._up is None:
            self._up = self._closure(lambda node: node.all_input_nodes, reverse=False)
        return self._members(self._up, node)


def _merge_partitions(self, partitions_by_id, assignment, partition_users, partition_map, partitions_order) -> None:
    """``GroupBasedPartitioner._merge_partitions`` with the cycle check on bit masks (same decisions, same order).

    The stock loop: for each partition ``p1`` not yet merged, in creation order, try every later ``p2`` not yet
    merged and merge it into ``p1`` when the union has no external user whose downstream nodes fall back inside it.
    Here ``outside`` is the OR of ``reach(u)`` over the union's external users ``u``; the merge is refused when it
    intersects the union. ``p1``'s part is kept between tries and recomputed only when ``p2`` swallows one of its
    external users. ``self.dependency_viewer`` is a :class:`CompactDependencies`.
    """
    deps = self.dependency_viewer
    def mask_of(nodes) -> int:
        mask = 0
        for node in nodes:
            mask |= deps.bit(node)
        return mask

    def external(users, inside: int) -> tuple[set, int]:
        """The users outside ``inside`` and the OR of their reach."""
        kept, reach = set(), 0
        for user in users:
            if not deps.bit(user) & inside:
                kept.add(user)
                reach |= deps.reach(user)
        return kept, reach

    partition_ids = list(partitions_by_id.keys())
    merged: set[int] = set()
    for i, p1 in enumerate(partition_ids):
        if p1 in merged:
            continue
        mask1 = mask_of(partitions_by_id[p1].nodes)
        users1, reach1 = external((u for node in partitions_by_id[p1].nodes for u in node.users), mask1)
        users1_mask = mask_of(users1)
        for p2 in partition_ids[i + 1 :]:
            if p2 in merged:
                continue
            nodes2 = partitions_by_id[p2].nodes
            mask2 = mask_of(nodes2)
            union = mask1 | mask2
            users2, reach2 = external((u for node in nodes2 for u in node.users), union)
            if users1_mask & mask2:  # p2 holds some of p1's external users: they are inside now
                users1_now, reach1_now = external(users1, union)
            else:
                users1_now, reach1_now = users1, reach1
            if (reach1_now | reach2) & union:
                continue
            self._perform_partition_merge(p1, p2, partitions_by_id, assignment, partition_users, partition_map,
                                          partitions_order)
            merged.add(p2)
            mask1, users1, reach1 = union, users1_now | users2, reach1_now | reach2
            users1_mask = mask_of(users1)


def _sort_in_place(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Topologically sort ``gm``'s graph in place, keeping the order where it is valid (``legalize_graph``'s job
    without its copy of the graph and recompile of the forward; ExecuTorch recompiles when it builds the program)."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(gm.graph)
    return gm


@contextlib.contextmanager
def fast_partitioning() -> Iterator[None]:
    """Inside the block (a lowering), the partitioners build :class:`CompactDependencies` as their dependency
    viewers, ExecuTorch's group partitioner merges with :func:`_merge_partitions`, and cutting out a partition
    re-sorts the graph with :func:`_sort_in_place`.

    Raises:
        ImportError: if a partitioner module is missing (the pinned torch / executorch versions have both).
    """
    from executorch.exir import lowered_backend_module
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner

    stock_merge = group_partitioner.GroupBasedPartitioner._merge_partitions

    def merge(self, *args) -> None:  # a partitioner built before the block keeps its stock viewer and loop
        merge_fn = _merge_partitions if isinstance(self.dependency_viewer, CompactDependencies) else stock_merge
        merge_fn(self, *args)

    patches = [(partitioner, "_DependencyViewer", CompactDependencies),
               (group_partitioner, "_DependencyViewer", CompactDependencies),
               (group_partitioner.GroupBasedPartitioner, "_merge_partitions", merge),
               (lowered_backend_module, "legalize_graph", _sort_in_place)]
    saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patches]
    try:
        for owner, attribute, replacement in patches:
            setattr(owner, attribute, replacement)
        yield
    finally:
        for owner, attribute, original in saved:
            setattr(owner, attribute, original)


__all__ = ["CompactDependencies", "fast_partitioning"]
