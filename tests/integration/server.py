"""Start the real aggregator (``python -m aggregator serve``) on loopback for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from device_sdk.sim.via_server import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token-0123456789"


class Server:
    """A real aggregator process; ``kill()`` sends SIGKILL, ``start()`` restarts it on the same port and folder."""

    def __init__(self, data_dir: Path, port: int | None = None, max_upload_mb: float = 64.0) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_upload_mb = max_upload_mb
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self) -> Server:
        env = {**os.environ, "AGGREGATOR_ADMIN_TOKEN": ADMIN_TOKEN, "AGGREGATOR_TICK_S": "0.2",
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
             "--max-upload-mb", str(self.max_upload_mb)], env=env, stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aggregator exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("aggregator did not start in 60 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def admin_headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
