"""Crash-safe file writes: a temporary file in the same folder, fsync, an atomic rename, then an fsync of the
folder (so the rename itself survives a crash). The one implementation: the device SDK and the aggregator's blob
store both write through it."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers (and a restart after a crash) see either the old file or the
    complete new one; the file gets ``mode`` (the temporary file is private until then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename into it); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (a folder, or a file created with mode 0600): the open descriptor,
    or ``None`` if another process holds the lock. Closing the descriptor releases it, and so does the process
    ending, however it ends, so a killed process never leaves a stale lock behind.

    Raises:
        OSError: the file system cannot lock ``path`` (NFS and some FUSE mounts refuse to lock a folder).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd
