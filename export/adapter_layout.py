"""How a program stores its adapter tensors: the one rule shared by the export, which builds the program's adapter
constants from the model, and the adapter update after a round, which builds them from a checkpoint's files.

A program may hold several adapter tensors as one fused constant: the LoRA A matrices of q, k and v stacked into
one product, projection experts' B matrices side by side, the LoRA scale folded in. Fewer, larger products per token are
what makes a decode step cheap (:mod:`export.fused`). Each constant is a :class:`FusedTensor`: a name in the
program, the adapter tensors it is made of (their names in the adapter files) and how. A program written without
fusion has no layout file; its constants are the adapter tensors themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from device_sdk.fileio import atomic_write_bytes

from .errors import ExportError

LAYOUT_FILE = "adapter_layout.json"
LAYOUT_VERSION = 1

#: ``same``: the tensor itself. ``rows`` / ``cols``: the sources concatenated along dim 0 / 1 (stacked A (E*r, D_in),
#: side-by-side B (D_out, E*r)). ``slot_cols``: one B (D_out, r) placed in column block ``slot`` of ``slots`` zero
#: blocks, (D_out, slots*r), for a product with the stacked A of several projections.
KINDS = ("same", "rows", "cols", "slot_cols")


@dataclass(frozen=True)
class FusedTensor:
    """One adapter constant of a program.

    Attributes:
        name: its name in the program (the key of ``adapter_keys.json``).
        kind: one of :data:`KINDS`.
        sources: the adapter tensors it is built from, by their names in the adapter files, in order.
        scale: a factor folded in (a LoRA scale on B matrices).
        slot, slots: the column block of a ``slot_cols`` tensor.
    """

    name: str
    kind: str
    sources: tuple[str, ...]
    scale: float = 1.0
    slot: int = 0
    slots: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExportError(f"adapter layout: unknown kind {self.kind!r} for {self.name}; known: {KINDS}")
        if not self.sources:
            raise ExportError(f"adapter layout: {self.name} has no source tensors")
        if self.kind in ("same", "slot_cols") and len(self.sources) != 1:
            raise ExportError(f"adapter layout: a {self.kind} tensor has one source, {self.name} has "
                              f"{len(self.sources)}")
        if not 0 <= self.slot < self.slots:
            raise ExportError(f"adapter layout: slot {self.slot} of {self.slots} for {self.name}")

    def build(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The constant from the adapter tensors ``{file name: tensor}``: float32, contiguous.

        Raises:
            ExportError: if a source is missing or the sources' shapes do not fit together.
        """
        missing = [s for s in self.sources if s not in tensors]
        if missing:
            raise ExportError(f"adapter tensor {missing[0]} is missing (needed for {self.name}); the adapters do not "
                              "fit this program: export it again")
        parts = [tensors[s].detach().to(torch.float32) for s in self.sources]
        if any(p.dim() != 2 for p in parts):
            raise ExportError(f"{self.name}: adapter tensors must be 2-D, got shapes {[tuple(p.shape) for p in parts]}")
        try:
            if self.kind == "same":
                out = parts[0]
            elif self.kind == "rows":
                out = torch.cat(parts, dim=0)
            elif self.kind == "cols":
                out = torch.cat(parts, dim=1)
            else:  # slot_cols
                rows, width = parts[0].shape
                out = parts[0].new_zeros(rows, width * self.slots)
                out[:, self.slot * width:(self.slot + 1) * width] = parts[0]
        except RuntimeError as err:
            raise ExportError(f"{self.name}: the adapter tensors {self.sources} do not fit together ({err}); the "
                              "adapters do not fit this program: export it again") from err
        return (out * self.scale).contiguous()


def build_all(layout: list[FusedTensor], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every constant of ``layout`` from the adapter tensors ``{file name: tensor}``.

    Raises:
        ExportError: if a source is missing, or a tensor is used by no constant (adapters of another shape, such as
            more experts than the program has).
    """
    used = {s for fused in layout for s in fused.sources}
    unused = sorted(set(tensors) - used)
    if unused:
        raise ExportError(f"{len(unused)} adapter tensor(s) have no place in this program (e.g. {unused[:2]}): the "
                          "adapters are of another shape than the exported model; export it again")
    return {fused.name: fused.build(tensors) for fused in layout}


def identity_layout(names: list[str]) -> list[FusedTensor]:
    """The layout of a program that stores every adapter tensor as it is."""
    return [FusedTensor(name, "same", (name,)) for name in names]


def save_layout(folder: Path, layout: list[FusedTensor]) -> Path:
    path = Path(folder) / LAYOUT_FILE
    payload = {"version": LAYOUT_VERSION, "tensors": [{**asdict(f), "sources": list(f.sources)} for f in layout]}
    atomic_write_bytes(path, json.dumps(payload, indent=0).encode())
    return path


def load_layout(folder: Path) -> list[FusedTensor] | None:
    """The layout stored beside a program, or ``None`` when it has none (every adapter tensor stored as it is).

    Raises:
        ExportError: for a layout file this SDK cannot read.
    """
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") != LAYOUT_VERSION:
            raise ExportError(f"{path} has layout version {payload.get('version')!r}; this SDK reads version "
                              f"{LAYOUT_VERSION}: export the program again with this SDK")
        return [FusedTensor(t["name"], t["kind"], tuple(t["sources"]), float(t["scale"]), int(t["slot"]),
                            int(t["slots"])) for t in payload["tensors"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(f"{path} is not a readable adapter layout ({type(err).__name__}: {err}); export the "
                          "program again") from err


__all__ = ["KINDS", "LAYOUT_FILE", "FusedTensor", "build_all", "identity_layout", "load_layout", "save_layout"]
