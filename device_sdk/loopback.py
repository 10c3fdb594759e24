"""Start the real aggregator (``python -m aggregator serve``) as a child process on 127.0.0.1.

Used by ``simulate --via-server``, the federation demo and the integration tests. With ``port=0`` the server binds
a port the operating system picks and reports it through ``--port-file``: several servers can start at once (tests
in parallel, two simulations) without racing for a port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .errors import SDKError

ROOT = Path(__file__).resolve().parents[1]


def start_aggregator(data_dir: Path, log_path: Path, env: dict[str, str] | None = None, port: int = 0,
                     extra_args: tuple[str, ...] = (), startup_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Start ``python -m aggregator serve`` on loopback and wait until ``/health`` answers.

    Args:
        data_dir: the server's database and blob folder (created if missing; an existing one is resumed).
        log_path: the server's stdout and stderr are appended here.
        env: the environment (default: this process's); the project root is added to ``PYTHONPATH``.
        port: 0 for a port the operating system picks, or a fixed port (e.g. to restart a killed server).
        extra_args: more ``serve`` options, e.g. ``("--max-upload-mb", "1")``.

    Returns:
        ``(process, port)``.

    Raises:
        SDKError: if the server exits or does not answer within ``startup_s`` (the message ends with its log).
    """
    data_dir, log_path = Path(data_dir), Path(log_path)
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = data_dir / f".port-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "aggregator", "serve", "--data-dir", str(data_dir), "--host",
                                 "127.0.0.1", "--port", str(port), "--port-file", str(port_file), *extra_args],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + startup_s
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SDKError(f"the aggregator exited on start (code {proc.returncode}): "
                               f"{log_path.read_text(errors='replace')[-1500:]}")
            if port_file.is_file():
                bound = int(port_file.read_text())
                try:
                    if httpx.get(f"http://127.0.0.1:{bound}/health", timeout=2).status_code == 200:
                        return proc, bound
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        stop_aggregator(proc)
        raise SDKError(f"the aggregator did not answer within {startup_s:.0f} s: "
                       f"{log_path.read_text(errors='replace')[-1500:]}")
    finally:
        port_file.unlink(missing_ok=True)


def stop_aggregator(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
