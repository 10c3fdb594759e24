"""ExecuTorch export (XNNPACK): fp32, dynamic sequence length, batch 1, router and top-k gating in the graph.

Weights go to two data files beside the program: ``base.ptd`` (frozen base model) and ``adapters.ptd`` (attention
LoRA, generalists, specialists, routers), so that after a federated round only the small adapters file is
replaced on the phone (:func:`update_adapters`).

Inside an XNNPACK program a weight's key in the data file is the sha256 of its bytes, and equal tensors (such as
zero-initialised LoRA B matrices) would share one key. The program is therefore lowered with unique random
stand-ins for every adapter tensor; each adapter's key is read off by hash (``adapter_keys.json``), and the real
adapter values are then written under those keys. The graph does not depend on the values, so the program stays
valid for any adapter values of the same shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from device_sdk.fileio import atomic_write_bytes

from .errors import ExportError, exporter_failures
from .lean_passes import lean_passes
from .partitioning import fast_partitioning

log = logging.getLogger(__name__)

PROGRAM, BASE_DATA, ADAPTER_DATA, ADAPTER_KEYS = "model.pte", "base.ptd", "adapters.ptd", "adapter_keys.json"
ALIGNMENT = 64


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _payload(data: bytes):
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return FlatTensorSerializer().deserialize(Cord(data))


def _serialize(named: dict[str, tuple[bytes, object]]) -> bytes:
    """A flat-tensor (.ptd) file holding ``{key: (bytes, tensor_layout)}``, one buffer each."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    keys = sorted(named)
    payload = DataPayload(buffers=[named[k][0] for k in keys],
                          named_data={k: DataEntry(buffer_index=i, alignment=ALIGNMENT, tensor_layout=named[k][1])
                                      for i, k in enumerate(keys)})
    return bytes(FlatTensorSerializer().serialize(payload))


def read_ptd(path: Path) -> dict[str, tuple[bytes, object]]:
    """``{key: (bytes, tensor_layout)}`` of a .ptd data file (the layout is ``None`` for delegate data)."""
    return read_ptd_bytes(Path(path).read_bytes())


def export_pte(model: nn.Module, out: Path, max_seq: int, adapters: dict[str, nn.Parameter],
               quantized: bool = False, example_inputs: tuple | None = None,
               dynamic_shapes: dict | None = None, program: str = PROGRAM,
               cache_buffers: tuple[str, ...] = ()) -> dict:
    """Lower ``model`` (input_ids (1, T) -> logits) to ``out/model.pte`` + ``base.ptd`` + ``adapters.ptd``.

    Args:
        model: a :class:`export.load.LogitsModel` (or a KV-cache form, :mod:`export.kv`, with its
            ``example_inputs`` and ``dynamic_shapes``).
        adapters: ``{name: parameter}`` of every adapter tensor (names as in the adapter files); ``model`` must
            reach them as ``model.<name>``.
        example_inputs, dynamic_shapes: for :func:`torch.export.export` (default: ``input_ids`` of dynamic length
            2..max_seq).
        program: the program's file name (its data files are ``base.ptd`` and ``adapters.ptd`` either way).
        cache_buffers: name patterns of mutable buffers (a KV cache): their initial zeros are stored in the
            program (ExecuTorch otherwise leaves mutated buffers uninitialised; a program that reads the cache
            through a mask would turn a NaN bit pattern there into NaN logits: 0 * NaN), and their updates run in
            place (without the reinplace pass every call copies the whole cache twice).

    Returns:
        ``{"file", "seconds", "adapter_keys"}``.

    Raises:
        ExportError: if lowering fails or an adapter tensor cannot be found in the adapters data file.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    if quantized:
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized ops' out variants)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fqn = {f"model.{name}" for name in adapters}
    # constants a delegate takes as runtime inputs (such as a batched product's operand) stay placeholders of the
    # program, named after their parameter: filled in once the program is lowered
    placeholder_fqn: dict[str, str] = {}

    def tag(node: torch.fx.Node) -> str:
        target = str(node.target)
        return "adapters" if placeholder_fqn.get(target, target) in fqn else "base"

    real = {name: p.detach().clone() for name, p in adapters.items()}
    generator = torch.Generator().manual_seed(20240611)
    example = example_inputs or (torch.zeros(1, min(16, max_seq), dtype=torch.long),)
    dims = dynamic_shapes or {"input_ids": {1: torch.export.Dim("seq", min=2, max=max_seq)}}
    start = time.perf_counter()
    try:
        with exporter_failures("ExecuTorch export"), torch.no_grad():
            for p in adapters.values():  # unique stand-ins: one key per adapter tensor
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-2)
            stand_in = {_digest(p): name for name, p in adapters.items()}
            if len(stand_in) != len(adapters):
                raise ExportError("adapter stand-ins collided; retry the export")
            unlifted = torch.export.export(model, example, dynamic_shapes=dims).module()
            delegate_external_constants_pass_unlifted(unlifted, tag)
            exported = torch.export.export(unlifted, example, dynamic_shapes=dims)
            log.info("ExecuTorch: graph captured in %.0f s; lowering to XNNPACK...", time.perf_counter() - start)
            # stock partitioning costs O(nodes^2) memory and time; most passes re-trace graphs they leave unchanged
            with fast_partitioning(), lean_passes():
                lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
                log.info("ExecuTorch: lowered in %.0f s so far; writing the program...", time.perf_counter() - start)
                placeholder_fqn.update(lowered.exported_program().graph_signature.inputs_to_parameters)
                from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

                passes = [InitializedMutableBufferPass(list(cache_buffers))] if cache_buffers else []
                et = lowered.to_executorch(ExecutorchBackendConfig(external_constants=tag, passes=passes,
                                                                   run_reinplace_pass=bool(cache_buffers),
                                                                   do_quant_fusion_and_const_prop=quantized))
            data = {name: bytes(cord) for name, cord in et._tensor_data.items()}
    finally:
        with torch.no_grad():
            for name, p in adapters.items():
                p.copy_(real[name])
    adapter_blobs = read_ptd_bytes(data["adapters"]) if "adapters" in data else {}
    keys: dict[str, str] = {}
    for key in adapter_blobs:
        name = stand_in.get(hashlib.sha256(adapter_blobs[key][0]).hexdigest())
        if name is None:
            raise ExportError(f"adapters data entry {key[:16]}... matches no adapter tensor (it was transformed "
                              "during lowering); this model layout is not supported for adapter updates")
        keys[name] = key
    missing = sorted(set(adapters) - set(keys))
    if missing:
        raise ExportError(f"{len(missing)} adapter tensor(s) were not stored in the adapters data file, e.g. "
                          f"{missing[:2]} (folded into other constants during lowering)")
    (out / program).write_bytes(et.buffer)
    atomic_write_bytes(out / BASE_DATA, data["base"])
    layouts = {name: adapter_blobs[key][1] for name, key in keys.items()}
    (out / ADAPTER_KEYS).write_text(json.dumps(keys, indent=0, sort_keys=True))
    atomic_write_bytes(out / ADAPTER_DATA, _serialize({key: (adapter_blobs[key][0], layouts[name])
                                                  for name, key in keys.items()}))
    write_adapters(out, real)
    seconds = time.perf_counter() - start
    log.info("wrote %s, %s and %s in %.1f s", program, BASE_DATA, ADAPTER_DATA, seconds)
    return {"file": program, "seconds": seconds, "data_files": [BASE_DATA, ADAPTER_DATA]}


def read_ptd_bytes(data: bytes) -> dict[str, tuple[bytes, object]]:
    payload = _payload(data)
    return {k: (bytes(payload.buffers[e.buffer_index]), e.tensor_layout) for k, e in payload.named_data.items()}


def write_adapters(program_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """(Re)write ``adapters.ptd`` with ``tensors`` under the keys the program expects (atomically).

    Raises:
        ExportError: if the names or sizes do not match the program's adapters.
    """
    program_dir = Path(program_dir)
    keys_file = program_dir / ADAPTER_KEYS
    if not keys_file.is_file():
        raise ExportError(f"{program_dir} has no {ADAPTER_KEYS}: it is not an ExecuTorch export of this SDK")
    keys = json.loads(keys_file.read_text())
    missing, extra = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing or extra:
        raise ExportError(f"new adapters do not fit the program: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(extra)} unexpected (e.g. {extra[:2]}); export the program again")
    if not (program_dir / ADAPTER_DATA).is_file():
        raise ExportError(f"{program_dir} has no {ADAPTER_DATA}")
    current = read_ptd(program_dir / ADAPTER_DATA)
    blobs = {}
    for name, key in keys.items():
        t = tensors[name]
        if t.dtype != torch.float32 or not torch.isfinite(t).all():
            raise ExportError(f"adapter {name} must be finite float32, got {t.dtype}")
        blob = t.detach().contiguous().numpy().tobytes()
        if key not in current:
            raise ExportError(f"{ADAPTER_DATA} has no entry for {name}; export the program again")
        if len(current[key][0]) != len(blob):
            raise ExportError(f"adapter {name} has {t.numel()} values, the program expects "
                              f"{len(current[key][0]) // 4}")
        blobs[key] = (blob, current[key][1])
    path = program_dir / ADAPTER_DATA
    atomic_write_bytes(path, _serialize(blobs))
    return path


@contextlib.contextmanager
def data_beside(program: Path) -> Iterator[Path | None]:
    """The one data file the Python loaders take for ``program``: its base and adapter data merged into a
    temporary ``.merged.ptd`` beside it (the C++ runtime takes several files), or ``None`` for a program without
    data files. The file is removed on exit: a loaded program keeps it mapped."""
    program_dir = Path(program).parent
    if not (program_dir / BASE_DATA).is_file():
        yield None
        return
    merged = {**read_ptd(program_dir / BASE_DATA), **read_ptd(program_dir / ADAPTER_DATA)}
    path = program_dir / ".merged.ptd"
    atomic_write_bytes(path, _serialize(merged))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def load_forward(program: Path):
    """The ``forward`` method of an exported program on the ExecuTorch Python runtime, with the base and adapter
    data files beside it when there are any."""
    import executorch.kernels.quantized  # noqa: F401  (kernels of 8da4w / 8da8w programs)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (KV programs' cache and attention ops)
    from executorch.runtime import Runtime

    with data_beside(program) as data:
        return Runtime.get().load_program(str(program), data_path=str(data) if data else None).load_method("forward")


class PteRunner:
    """Runs an exported program with the ExecuTorch Python runtime: ``(1, T) int64 -> (1, T, V) float32``."""

    def __init__(self, program: Path) -> None:
        self.method = load_forward(program)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != 1:
            return torch.cat([self(row[None]) for row in input_ids])
        return self.method.execute([input_ids])[0]
