"""ExecuTorch export (XNNPACK): fp32, dynamic sequence length, batch 1, router and top-k gating in the graph."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError

log = logging.getLogger(__name__)


def export_pte(model: nn.Module, path: Path, max_seq: int) -> dict:
    """Lower ``model`` (input_ids (1, T) -> logits) to an XNNPACK ExecuTorch program.

    Returns:
        ``{"file", "seconds"}``.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, min(16, max_seq), dtype=torch.long)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,),
                                          dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=2,
                                                                                            max=max_seq)}})
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        path.write_bytes(lowered.buffer)
    except Exception as err:  # torch.export / exir raise many types; report them as one
        raise ExportError(f"ExecuTorch export failed: {type(err).__name__}: {str(err)[:500]}") from err
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s", path, seconds)
    return {"file": path.name, "seconds": seconds}


class PteRunner:
    """Runs an exported ``.pte`` with the ExecuTorch Python runtime: ``(1, T) int64 -> (1, T, V) float32``."""

    def __init__(self, path: Path) -> None:
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != 1:
            return torch.cat([self(row[None]) for row in input_ids])
        return self.method.execute([input_ids])[0]
