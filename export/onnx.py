"""ONNX export (torch dynamo exporter): fp32 with dynamic batch and sequence length."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError

log = logging.getLogger(__name__)


def export_onnx(model: nn.Module, path: Path, max_seq: int, max_batch: int = 64) -> dict:
    """Export ``model`` (input_ids -> logits) to one ``.onnx`` file (weights inside, < 2 GB).

    Args:
        model: a :class:`export.load.LogitsModel`.
        path: output file.
        max_seq: largest sequence length the graph accepts.

    Returns:
        ``{"file", "seconds"}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, min(16, max_seq), dtype=torch.long)
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=max_batch),
                          1: torch.export.Dim("seq", min=2, max=max_seq)}}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dims,
                                        input_names=["input_ids"], output_names=["logits"], external_data=False,
                                        verbose=False)
        program.save(str(path), external_data=False)
    except Exception as err:  # the exporter raises many types; report them as one
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {str(err)[:500]}") from err
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s", path, seconds)
    return {"file": path.name, "seconds": seconds}


class OnnxRunner:
    """Runs an exported ``.onnx`` file with onnxruntime: ``(B, T) int64 -> (B, T, V) float32``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input_ids": input_ids.numpy()})[0])


def adapter_matmuls(model, max_adapter_dim: int) -> list[str]:
    """Names of MatMul nodes whose constant weight has a dimension <= ``max_adapter_dim``: the LoRA A/B and router
    projections (rank and expert counts are far below any base projection's width). They stay fp32."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2
            and min(inits[n.input[1]]) <= max_adapter_dim]


def quantize_int4(src: Path, dst: Path, max_adapter_dim: int, block_size: int = 32) -> dict:
    """Block-quantise the base MatMul weights of an exported ``.onnx`` to int4 (``MatMulNBits``, asymmetric,
    ``block_size`` values per scale); adapters and routers stay fp32.

    Returns:
        ``{"file", "seconds", "quantized", "kept_fp32"}``.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # 1 line/node
    start = time.perf_counter()
    model = onnx.load(str(src))
    exclude = adapter_matmuls(model, max_adapter_dim)
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as err:  # onnxruntime's quantizer raises many types; report them as one
        raise ExportError(f"int4 quantisation failed: {type(err).__name__}: {str(err)[:500]}") from err
    quantized = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(dst), load_external_data=False).graph.node)
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s: %d MatMul -> int4, %d adapter/router MatMul kept fp32", Path(dst).name, seconds,
             quantized, len(exclude))
    return {"file": Path(dst).name, "seconds": seconds, "quantized": quantized, "kept_fp32": len(exclude),
            "matmuls": before}
