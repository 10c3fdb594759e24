"""Safetensors blobs on disk, written atomically (temp file, fsync, rename, fsync of the folder)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from device_sdk.fileio import atomic_write_bytes

from .errors import InvalidUpdate


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (readable by the server's user only) so that a crash leaves either the old file or
    the complete new one: :func:`device_sdk.fileio.atomic_write_bytes`."""
    atomic_write_bytes(path, data, mode=0o600)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors payload (no pickle involved).

    Raises:
        InvalidUpdate: for anything that is not a complete safetensors file.
    """
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidUpdate(f"body is not a valid safetensors file: {err}") from err
    header_len = int.from_bytes(data[:8], "little")
    try:
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except ValueError as err:
        raise InvalidUpdate(f"safetensors header is not JSON: {err}") from err
    return tensors, metadata


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
