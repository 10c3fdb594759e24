"""Lowering without needless retraces: an ExportPass that changed nothing returns the graph it was given.

Every pass of ExecuTorch's edge pipeline and of XNNPACK's per-partition pass manager ends with
``super().call(graph_module)``: a re-trace of the whole graph with fake tensors that rebuilds each node and its
metadata. XNNPACK runs 16 such passes on every partition, most of which find nothing to do in a language model
(batch norms, 1-d convolutions, PReLU, bilinear upsampling, ...). Profiled on SmolLM2's 8da4w KV program, the
re-traces were most of the lowering (docs/results.md, issue 13).

:func:`lean_passes` skips a re-trace exactly when the graph is the one the previous re-trace produced: every node
with the same operation, target, arguments and name (:func:`fingerprint`). A pass whose own work happens during
the re-trace (it overrides an ``ExportPass`` hook such as ``call_operator``) always re-traces. Programs lowered
inside the block are byte-identical to stock ones (tested on the tiny models, fp32 and quantised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_HOOKS = ("call_operator", "call_sym", "call_cond", "call_map", "call_getitem", "call_delegate", "call_submodule",
          "placeholder", "output", "on_attr", "call_size_operator", "call_while", "call_scan")
_MARK = "_lean_passes_fingerprint"


def _arg_key(arg: object) -> object:
    if isinstance(arg, torch.fx.Node):
        return ("node", arg.name)
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_arg_key(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _arg_key(v)) for k, v in arg.items()))
    if isinstance(arg, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                        torch.memory_format)):
        return (type(arg).__name__, repr(arg))
    return ("object", id(arg))  # anything else (a SymInt, a tensor): equal only to itself


def fingerprint(graph_module: torch.fx.GraphModule) -> tuple:
    """The structure of ``graph_module``'s graph: per node its kind, name, target and arguments (nodes by name)."""
    return tuple((node.op, node.name, str(node.target) if node.op != "call_function" else node.target,
                  _arg_key(node.args), _arg_key(node.kwargs)) for node in graph_module.graph.nodes)


def _retraces_for_its_work(export_pass: object) -> bool:
    from executorch.exir.pass_base import ExportPass

    return any(getattr(type(export_pass), hook, None) is not getattr(ExportPass, hook, None) for hook in _HOOKS)


@contextlib.contextmanager
def lean_passes() -> Iterator[None]:
    """Inside the block, ``ExportPass.call`` on a graph unchanged since its last re-trace returns it as it is
    (``PassResult(graph_module, False)``); every re-trace marks its output with :func:`fingerprint`."""
    from executorch.exir.pass_base import _ExportPassBase
    from torch.fx.passes.infra.pass_base import PassResult

    stock = _ExportPassBase.call

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        mark = getattr(graph_module, _MARK, None)
        if mark is not None and not _retraces_for_its_work(self) and mark == fingerprint(graph_module):
            return PassResult(graph_module, False)
        result = stock(self, graph_module)
        setattr(result.graph_module, _MARK, fingerprint(result.graph_module))
        return result

    _ExportPassBase.call = call
    try:
        yield
    finally:
        _ExportPassBase.call = stock


__all__ = ["fingerprint", "lean_passes"]
