"""Training steps through ``torch.compile``, one decoder block at a time (``TrainConfig.compile``).

Every decoder block of a model (the module that holds a routed MLP: a Llama decoder layer, a GPT-2 block) runs
its forward and backward as one compiled graph while gradients are recorded; evaluation (``no_grad``) stays eager.
The blocks of a model share their code, so they share graphs (dynamo passes each block's parameters as inputs):
one for the first block, whose input carries no gradient, and one for all the others, per step kind (expert,
router) and expert count; each compiles once, about a minute on a CPU. Inductor fuses what eager PyTorch runs as
separate passes: the norms, the rotary embedding, the autocast casts, the low-rank additions, the experts'
activations and gated mix, and their backward.

A simulation of users with many expert counts in one process needs more than dynamo's default of 8 graphs per
function, past which it would run the blocks eager without a word: compiled blocks allow :data:`RECOMPILE_LIMIT`.

Blocks with sparse routing stay eager: their shapes depend on the data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .errors import CompileError
from .lora import LoRAMoELinear, RoutedMLP

#: Graphs a compiled block's forward may have (2 per step kind and expert count: enough for 16 expert counts).
RECOMPILE_LIMIT = 64


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that hold a routed MLP as a direct child (its decoder blocks), in layer order."""
    return [m for m in model.modules() if any(isinstance(c, RoutedMLP) for c in m.children())]


def _sparse(block: nn.Module) -> bool:
    return any(isinstance(m, LoRAMoELinear) and m.sparse for m in block.modules())


@functools.cache
def _compiled(forward: Callable) -> Callable:
    """One block class's ``forward`` (unbound) through ``torch.compile``, built once per process."""
    return torch.compile(forward, dynamic=False)


def _dispatch(block: nn.Module, compiled: Callable, *args, **kwargs):
    """A compiled block's forward: the compiled graph while gradients are recorded, the eager forward otherwise."""
    if not torch.is_grad_enabled():
        return type(block).forward(block, *args, **kwargs)
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled(block, *args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        raise CompileError(f"torch.compile could not compile a decoder block ({type(err.inner_exception).__name__}: "
                           f"{str(err.inner_exception).strip().splitlines()[0][:300]}); on a CPU it needs a working "
                           "C++ compiler (gcc or clang; see torch._inductor.config.cpp.cxx). Install one, or train "
                           "without compile (leave --compile off)") from err


def is_compiled(block: nn.Module) -> bool:
    """Whether ``block`` runs compiled in training steps (set by :func:`compile_blocks`)."""
    forward = block.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _dispatch


def compile_blocks(model: nn.Module, enabled: bool = True) -> int:
    """Run ``model``'s decoder blocks compiled in training steps, or eager again with ``enabled=False``.

    The numbers are those of the eager model to float rounding (inductor keeps fused intermediates in fp32 where
    eager rounds each to bf16). The block's ``forward`` becomes an instance attribute (a ``functools.partial`` of
    the block, so ``copy.deepcopy`` of the model binds the copy's blocks); parameters, names and adapter files are
    unchanged.

    Returns:
        How many blocks run compiled now.
    """
    count = 0
    for block in decoder_blocks(model):
        block.__dict__.pop("forward", None)
        if enabled and not _sparse(block):
            block.forward = functools.partial(_dispatch, block, _compiled(type(block).forward))
            count += 1
    return count


__all__ = ["compile_blocks", "decoder_blocks", "is_compiled"]
