"""ONNX export (torch dynamo exporter): fp32 with dynamic batch and sequence length."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .blocks import q4_1_blocks
from .errors import ExportError, exporter_failures

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
    with exporter_failures("ONNX export"), torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dims,
                                    input_names=["input_ids"], output_names=["logits"], external_data=False,
                                    verbose=False)
        program.save(str(path), external_data=False)
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s", path, seconds)
    return {"file": path.name, "seconds": seconds}


def cpu_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads``: intra-op threads; ``None``: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """Runs an exported ``.onnx`` file with onnxruntime: ``(B, T) int64 -> (B, T, V) float32``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = cpu_session(path, threads)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input_ids": input_ids.numpy()})[0])


def adapter_matmuls(model, max_adapter_dim: int) -> list[str]:
    """Names of MatMul nodes whose constant weight has a dimension <= ``max_adapter_dim``: the LoRA A/B and router
    projections (rank and expert counts are far below any base projection's width). They stay fp32."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2
            and min(inits[n.input[1]]) <= max_adapter_dim]


def int4_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_1 blocks of :func:`export.blocks.q4_1_blocks` in ``MatMulNBits`` layout (``scale * q + low``, ``q`` in
    0..15; onnxruntime's integer zero points would round every block a second time).

    Args:
        weight: (K, N) float32, ``K`` a multiple of ``block_size``.

    Returns:
        ``(packed, scales, lows)``: (N, K / block_size, block_size / 2) uint8, two values per byte, low nibble
        first; (N * K / block_size,) float32; (K / block_size, N) float32.
    """
    k, n = weight.shape
    blocks = q4_1_blocks(torch.from_numpy(np.ascontiguousarray(weight.T)), block_size)
    q = blocks.q.numpy().reshape(n, k // block_size, block_size)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, blocks.scales.numpy().reshape(-1), np.ascontiguousarray(blocks.lows.numpy().T)


def block_sum_nodes(helper, x: str, block_size: int, k: int, prefix: str) -> tuple[list, str]:
    """Nodes that sum ``x`` (..., K) over each block of ``block_size`` inputs into (..., K / block_size): a reshape
    to rows of one block, ``ReduceSum`` and a reshape back (a token reads no weights; a (K, K / B) 0/1 matrix product
    read 295 KB per down projection of SmolLM2). Returns ``(nodes, output name)``; the constants they use are
    :func:`block_sum_constants`'s."""
    names = {t: f"{prefix}_{t}" for t in ("rows", "row_sums", "shape", "lead", "out_shape", "sums")}
    nodes = [
        helper.make_node("Reshape", [x, "int4_block_rows"], [names["rows"]], name=names["rows"]),
        helper.make_node("ReduceSum", [names["rows"], "int4_last_axis"], [names["row_sums"]], keepdims=0,
                         name=names["row_sums"]),
        helper.make_node("Shape", [x], [names["shape"]], name=names["shape"]),
        helper.make_node("Slice", [names["shape"], "int4_zero", "int4_minus_one"], [names["lead"]],
                         name=names["lead"]),
        helper.make_node("Concat", [names["lead"], f"int4_blocks_{k}"], [names["out_shape"]], axis=0,
                         name=names["out_shape"]),
        helper.make_node("Reshape", [names["row_sums"], names["out_shape"]], [names["sums"]], name=names["sums"]),
    ]
    return nodes, names["sums"]


def block_sum_constants(numpy_helper, block_size: int, widths: set[int]) -> list:
    """The int64 constants of :func:`block_sum_nodes` for inputs of the given widths."""
    arrays = {"int4_block_rows": [-1, block_size], "int4_last_axis": [-1], "int4_zero": [0],
              "int4_minus_one": [-1], **{f"int4_blocks_{k}": [k // block_size] for k in sorted(widths)}}
    return [numpy_helper.from_array(np.array(v, dtype=np.int64), name) for name, v in arrays.items()]


def quantize_int4(src: Path, dst: Path, max_adapter_dim: int, block_size: int = 32) -> dict:
    """Block-quantise the base MatMul weights of an exported ``.onnx`` to int4 (``MatMulNBits`` with zero point 0
    plus a per-block offset term, ``block_size`` values per scale, see :func:`int4_blocks`); adapters and routers
    stay fp32.

    Only MatMul nodes are converted: a projection applied to a 2-D input exports as a Gemm node and stays fp32
    (GPT-2's Conv1D always does); such base-sized Gemm weights are counted in ``gemm_fp32`` and logged.

    Returns:
        ``{"file", "seconds", "quantized", "kept_fp32", "matmuls", "gemm_fp32"}``.

    Raises:
        ExportError: if the model cannot be read or written.
    """
    import onnx
    from onnx import helper, numpy_helper

    start = time.perf_counter()
    try:
        model = onnx.load(str(src))
    except Exception as err:  # protobuf / IO errors
        raise ExportError(f"cannot read {src} for int4 quantisation: {err}") from err
    exclude = set(adapter_matmuls(model, max_adapter_dim))
    inits = {i.name: i for i in model.graph.initializer}
    nodes, quantized, converted, widths, summed = [], 0, {}, set(), {}
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    for node in model.graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if init is None or node.name in exclude or len(init.dims) != 2 or init.dims[0] % block_size:
            nodes.append(node)
            continue
        k, n = init.dims
        widths.add(k)
        if init.name not in converted:
            packed, scales, lows = int4_blocks(numpy_helper.to_array(init).astype(np.float32), block_size)
            zeros = np.zeros((n, -(-(k // block_size) // 2)), dtype=np.uint8)  # zero point 0: (q - 0) * scale
            names = tuple(f"{init.name}_{part}" for part in ("int4", "scales", "zero_points", "lows"))
            model.graph.initializer.extend(numpy_helper.from_array(a, name)
                                           for a, name in zip((packed, scales, zeros, lows), names))
            converted[init.name] = names
        q_name, s_name, z_name, low_name = converted[init.name]
        # x @ W = x @ (scale * q) + (x summed per block) @ lows: two exact terms, the first on the int4 kernel
        # MatMuls that read one input (q, k and v; gate and up) share its block sums
        base, offset = f"{node.name}_int4_scaled", f"{node.name}_int4_offset"
        summing = []
        if node.input[0] not in summed:
            summing, summed[node.input[0]] = block_sum_nodes(helper, node.input[0], block_size, k, f"{node.name}_int4")
        sums = summed[node.input[0]]
        nodes += [
            helper.make_node("MatMulNBits", [node.input[0], q_name, s_name, z_name], [base], name=base,
                             domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size),
            *summing,
            helper.make_node("MatMul", [sums, low_name], [offset], name=offset),
            helper.make_node("Add", [base, offset], list(node.output), name=f"{node.name}_int4"),
        ]
        quantized += 1
    gemm_fp32 = [n.name for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in inits
                 and len(inits[n.input[1]].dims) == 2 and min(inits[n.input[1]].dims) > max_adapter_dim]
    if gemm_fp32:
        log.warning("int4: %d Gemm node(s) with base-sized weights stay fp32 (only MatMul nodes are quantised), "
                    "e.g. %s", len(gemm_fp32), gemm_fp32[:2])
    model.graph.initializer.extend(block_sum_constants(numpy_helper, block_size, widths))
    used = {i for node in nodes for i in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    try:
        onnx.save(model, str(dst))
    except Exception as err:
        raise ExportError(f"cannot write {dst}: {err}") from err
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s: %d MatMul -> int4, %d adapter/router MatMul kept fp32", Path(dst).name, seconds,
             quantized, len(exclude))
    return {"file": Path(dst).name, "seconds": seconds, "quantized": quantized, "kept_fp32": len(exclude),
            "matmuls": before, "gemm_fp32": len(gemm_fp32)}
