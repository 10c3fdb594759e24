"""One aggregator per data directory: an exclusive ``flock`` held for the server's lifetime."""

from __future__ import annotations

import os
from pathlib import Path

from device_sdk.fileio import try_lock

from .errors import DataDirLocked


class DataDirLock:
    """An exclusive lock on a data directory (``flock`` on ``data_dir/aggregator.lock``) for one server's lifetime.

    The operating system releases it when the process ends, however it ends, so a killed server never leaves a stale
    lock behind.

    Raises:
        DataDirLocked: another process holds the lock (another aggregator serves the folder).
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "aggregator.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd: int | None = try_lock(self.path)
        except OSError as err:
            raise DataDirLocked(f"cannot lock {self.path} ({err}): this file system does not support locks; put "
                                "--data-dir on a local disk, so that no second server can open it at once") from err
        if self._fd is None:
            folder = self.path.parent.resolve()
            raise DataDirLocked(f"another aggregator is already serving the data directory {folder} (it holds "
                                f"{self.path.name}); stop that server first, or start this one with another --data-dir")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())  # who holds it, for the operator

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
