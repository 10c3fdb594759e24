"""Rebuild a device's personalised model (base + generalists + specialists + routers + attention LoRA) from its
saved adapters, ready for export: eval mode, the export form of the routed blocks (dense gates, per-expert weights, no
data-dependent shapes), logits-only forward."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from device_sdk.adapters import file_attention_rank, file_mixing, load_adapters, read_adapter_file
from device_sdk.checkpoint import latest_checkpoint
from device_sdk.config import AdapterConfig
from device_sdk.errors import SDKError
from device_sdk.inject import inject_adapters, use_export_form
from device_sdk.models import load_base_model
from device_sdk.parts import Role, iter_role_parameters
from device_sdk.tokenizer import Tokenizer

from .errors import ExportError


class LogitsModel(nn.Module):
    """``input_ids (B, T) int64 -> logits (B, T, V) float32``: the graph that is exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@dataclass
class Personalized:
    """A loaded personalised model and where it came from."""

    model: LogitsModel
    base_model: str
    tokenizer: Tokenizer
    adapter: AdapterConfig
    adapters_dir: Path
    info: dict

    def adapter_parameters(self) -> dict:
        """``{name: parameter}`` of every adapter tensor, named as in the adapter files."""
        return {name: p for name, p, _ in iter_role_parameters(self.model.model)}


def find_adapters(checkpoint: Path) -> tuple[Path, dict]:
    """The adapter folder of a device state dir, a checkpoint folder, a ``train-local`` output or an adapter folder.

    Raises:
        ExportError: if none is found.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ExportError(f"checkpoint {checkpoint} does not exist; pass a device state folder (with "
                          "checkpoints/LATEST), a train-local output folder or an adapters folder")
    latest = latest_checkpoint(checkpoint / "checkpoints")
    candidates = [latest / "adapters"] if latest else []
    candidates += [checkpoint / "adapters", checkpoint]
    for folder in candidates:
        if (folder / "generalist.safetensors").is_file() or (folder / "specialist.safetensors").is_file():
            info_file = folder.parent / "state.json"
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            return folder, info
    raise ExportError(f"no adapter files (generalist.safetensors / specialist.safetensors) under {checkpoint}; "
                      "pass a device state folder, a checkpoint folder or a train-local output folder")


def load_personalized(checkpoint: Path, cache_dir: Path | None = None) -> Personalized:
    """Load the base model named in the adapter files, inject the recorded adapter shape and load every role.

    Raises:
        ExportError: for a malformed checkpoint (missing or inconsistent files), naming the problem.
    """
    folder, info = find_adapters(checkpoint)
    meta = None
    for role in (Role.GENERALIST, Role.SPECIALIST):
        path = folder / f"{role.value}.safetensors"
        if path.is_file():
            try:
                meta = read_adapter_file(path)[1]
            except SDKError as err:
                raise ExportError(f"malformed checkpoint: {err}") from err
            break
    try:
        adapter = AdapterConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                                n_generalists=int(meta["n_generalists"]), n_specialists=int(meta["n_specialists"]),
                                top_k=int(meta["top_k"]), routing="dense", mixing=file_mixing(meta),
                                attention_rank=file_attention_rank(meta))
    except (KeyError, ValueError, TypeError) as err:
        raise ExportError(f"malformed checkpoint: adapter metadata in {folder} is incomplete ({err})") from err
    base = load_base_model(meta["base_model"], cache_dir=cache_dir)
    model = inject_adapters(base.model, adapter)
    try:
        loaded = load_adapters(model, folder, base.name)
    except SDKError as err:
        raise ExportError(f"malformed checkpoint: {err}") from err
    expected = {Role.ATTENTION, Role.GENERALIST} | ({Role.SPECIALIST} if adapter.n_specialists else set())
    expected |= {Role.ROUTER} if adapter.n_experts > 1 else set()
    missing = expected - set(loaded)
    if missing:
        raise ExportError(f"malformed checkpoint: {folder} lacks {sorted(r.value for r in missing)} adapter files")
    wrapped = LogitsModel(use_export_form(model)).eval()
    return Personalized(wrapped, base.name, base.tokenizer, adapter, folder, info)
