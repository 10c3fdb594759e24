"""Start the real aggregator (``python -m aggregator serve``) on loopback for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from device_sdk.loopback import start_aggregator, stop_aggregator

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token-0123456789"


class Server:
    """A real aggregator process; ``kill()`` sends SIGKILL, ``start()`` restarts it on the same port and folder.

    The first start binds a port the operating system picks (tests may run in parallel)."""

    def __init__(self, data_dir: Path, max_upload_mb: float = 64.0) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.max_upload_mb = max_upload_mb
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "AGGREGATOR_ADMIN_TOKEN": ADMIN_TOKEN, "AGGREGATOR_TICK_S": "0.2"}
        self.proc, self.port = start_aggregator(self.data_dir, self.log, env, port=self.port,
                                                extra_args=("--max-upload-mb", str(self.max_upload_mb)), startup_s=60)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            stop_aggregator(self.proc, timeout_s=10)


def admin_headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
