"""Export and run the KV-cache forms of :mod:`export.kv`: an ExecuTorch program (XNNPACK; fp32, 8da8w, 8da4w) whose
cache lives in mutable buffers, and an ONNX model with the cache as explicit inputs and outputs.

Both files take ``input_ids`` (1, T) int64 with ``1 <= T <= max_seq`` and ``input_pos`` (1,) int64 (the position
of the first token) and return the logits of the last token, (1, 1, V). The runners here give both one interface
(:class:`KVRunner`): ``reset()`` before a new sequence, then ``runner(ids, pos) -> (V,)`` logits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .errors import ExportError, exporter_failures
from .kv import FunctionalKVLM, KVCacheLM, cache_shape

log = logging.getLogger(__name__)


class KVRunner(Protocol):
    """A KV-cache model: ``reset()`` starts a sequence; ``runner(ids (1, T) int64, pos) -> (V,) float32``
    logits of the last of the T tokens placed at positions ``pos .. pos + T - 1``."""

    max_seq: int

    def reset(self) -> None: ...

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor: ...


def _example(max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, min(8, max_seq), dtype=torch.long), torch.zeros(1, dtype=torch.long)


def _seq_dim(max_seq: int) -> torch.export.Dim:
    return torch.export.Dim("seq", min=1, max=max_seq)


def export_kv_pte(model: nn.Module, out: Path, max_seq: int, quantize: str = "none") -> dict:
    """Lower the KV-cache form of ``model`` to ``out/model.pte`` + ``base.ptd`` + ``adapters.ptd`` (the split and
    the adapter keys of :func:`export.executorch.export_pte`: a round replaces ``adapters.ptd`` only).

    Args:
        model: the personalised HF causal LM (``Personalized.model.model``), Llama family.
        max_seq: cache positions (prompt plus generated tokens).
        quantize: ``none``, ``8da8w`` or ``8da4w`` (:func:`export.quantize.quantize_program`).

    Returns:
        ``export_pte``'s ``{"file", "seconds", "data_files"}`` (with the adapter layout file, see
        :mod:`export.fused`) and ``adapter_constants``.

    Raises:
        ExportError: for a model outside the Llama family or a failed lowering.
    """
    from .adapter_layout import save_layout
    from .executorch import export_pte
    from .fused import fuse_adapters

    program = KVCacheLM(model, max_seq).eval()
    if quantize != "none":
        from .quantize import quantize_program

        program, counts = quantize_program(program, quantize)
        log.info("%s: %d base linears, %d embedding(s) int8", quantize, counts["linears"], counts["embeddings"])
    program, layout = fuse_adapters(program, copy_first=quantize == "none")  # a quantised program is a copy already
    adapters = {fused.name: program.model.get_parameter(fused.name) for fused in layout}
    dims = {"input_ids": {1: _seq_dim(max_seq)}, "input_pos": None}
    result = export_pte(program, out, max_seq, adapters, quantized=quantize != "none",
                        example_inputs=_example(max_seq), dynamic_shapes=dims,
                        cache_buffers=("k_cache_", "v_cache_"))
    layout_file = save_layout(out, layout)
    return {**result, "data_files": [*result["data_files"], layout_file.name], "adapter_constants": len(layout)}


def export_kv_onnx(model: nn.Module, path: Path, max_seq: int) -> dict:
    """Export the KV-cache form of ``model`` to one ``.onnx`` file: inputs ``input_ids``, ``input_pos``,
    ``past_key.i`` / ``past_value.i`` (1, H_kv, max_seq, d); outputs ``logits`` (1, 1, V), ``present_key.i`` /
    ``present_value.i``.

    Returns:
        ``{"file", "seconds"}``.

    Raises:
        ExportError: for a model outside the Llama family or an exporter failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = FunctionalKVLM(model, max_seq).eval()
    cache = wrapped.empty_cache()
    dims = {"input_ids": {1: _seq_dim(max_seq)}, "input_pos": None, "cache": [None] * len(cache)}
    start = time.perf_counter()
    with exporter_failures("ONNX KV-cache export"), torch.no_grad():
        program = torch.onnx.export(wrapped, (*_example(max_seq), cache), dynamo=True, dynamic_shapes=dims,
                                    input_names=["input_ids", "input_pos", *wrapped.cache_names("past")],
                                    output_names=["logits", *wrapped.cache_names("present")],
                                    external_data=False, verbose=False)
        program.save(str(path), external_data=False)
    seconds = time.perf_counter() - start
    log.info("wrote %s (KV cache, max_seq %d) in %.1f s", path, max_seq, seconds)
    return {"file": path.name, "seconds": seconds}


def _check(input_ids: torch.Tensor, pos: int, max_seq: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ExportError(f"input_ids must be (1, T) with T >= 1, got {tuple(input_ids.shape)}")
    if pos < 0 or pos + input_ids.shape[1] > max_seq:
        raise ExportError(f"tokens at positions {pos}..{pos + input_ids.shape[1] - 1} do not fit the cache of "
                          f"{max_seq} positions (export with a larger --max-seq)")


class EagerKV:
    """The PyTorch KV-cache model behind the same interface (a reference for the exported runners)."""

    def __init__(self, model: nn.Module, max_seq: int) -> None:
        self.module = KVCacheLM(model, max_seq).eval()
        self.max_seq = max_seq

    def reset(self) -> None:
        self.module.reset()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        _check(input_ids, pos, self.max_seq)
        return self.module(input_ids, torch.tensor([pos]))[0, -1]


class PteKV:
    """A KV-cache ``model.pte`` on the ExecuTorch Python runtime (base and adapter data loaded beside it)."""

    def __init__(self, program: Path, max_seq: int) -> None:
        from .executorch import load_forward

        self.method = load_forward(program)
        self.max_seq = max_seq

    def reset(self) -> None:
        """Nothing to do: positions at or after ``pos`` are written before they are read."""

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        _check(input_ids, pos, self.max_seq)
        return self.method.execute([input_ids.to(torch.long), torch.tensor([pos], dtype=torch.long)])[0][0, -1]


class OnnxKV:
    """A KV-cache ``.onnx`` on onnxruntime; the cache arrays are kept here between calls."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from .onnx import cpu_session

        self.session = cpu_session(path, threads)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_")]
        if "input_pos" not in inputs or not self.past:
            raise ExportError(f"{path} is not a KV-cache model (inputs {sorted(inputs)[:4]}...); export it with "
                              "--kv-cache")
        self.shape = tuple(int(d) for d in inputs[self.past[0]])
        self.max_seq = self.shape[2]
        self.cache: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        self.cache = [np.zeros(self.shape, dtype=np.float32) for _ in self.past]

    def __call__(self, input_ids: torch.Tensor, pos: int) -> torch.Tensor:
        _check(input_ids, pos, self.max_seq)
        feeds = {"input_ids": input_ids.to(torch.long).numpy(), "input_pos": np.array([pos], dtype=np.int64),
                 **dict(zip(self.past, self.cache))}
        logits, *self.cache = self.session.run(None, feeds)
        return torch.from_numpy(logits[0, -1])


def kv_runner(path: Path, max_seq: int) -> KVRunner:
    """The runner of an exported KV-cache file (``.pte`` or ``.onnx``)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; give the model.pte or model.onnx of a --kv-cache export")
    return PteKV(path, max_seq) if path.suffix == ".pte" else OnnxKV(path)


__all__ = ["EagerKV", "KVRunner", "OnnxKV", "PteKV", "cache_shape", "export_kv_onnx", "export_kv_pte", "kv_runner"]
