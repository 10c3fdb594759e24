"""Safetensors blobs on disk, written atomically (temp file, fsync, rename, fsync of the folder)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from device_sdk.federated import wire
from device_sdk.fileio import atomic_write_bytes

from .aggregate import as_invalid_update


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (readable by the server's user only) so that a crash leaves either the old file or
    the complete new one: :func:`device_sdk.fileio.atomic_write_bytes`."""
    atomic_write_bytes(path, data, mode=0o600)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`device_sdk.federated.wire.decode`.

    Raises:
        InvalidUpdate: for anything that is not a complete safetensors file.
    """
    with as_invalid_update():
        return wire.decode(data)


def read_metadata(metadata: dict[str, str]) -> tuple[int, dict[str, float]]:
    """:func:`device_sdk.federated.wire.read_metadata` (token count and metrics of an upload).

    Raises:
        InvalidUpdate: for a token count or a metric that is not a number in range.
    """
    with as_invalid_update():
        return wire.read_metadata(metadata)


to_bytes = wire.encode
canonical_metadata = wire.canonical_metadata
