"""Starting our Flower apps: Flower's simulation engine in this process, or a SuperLink and SuperNodes on loopback.

Both keep everything on the machine: Flower's telemetry and update check are off (``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``), Ray's usage statistics too (``RAY_USAGE_STATS_ENABLED=0``), Ray binds to
127.0.0.1, and a SuperLink never installs an app's dependencies at run time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..errors import SDKError
from ..sim.config import SimConfig
from .wire import FlowerRun

log = logging.getLogger(__name__)

#: Environment of every Flower process we start (and of this one before Flower is imported).
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
#: The Flower app folder (its pyproject.toml names our ServerApp and ClientApp and the default run config).
EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "flower_app"


def offline_env() -> None:
    """Turn Flower's and Ray's phoning home off in this process (call before starting either)."""
    os.environ.update(OFFLINE_ENV)


def backend_config(cfg: SimConfig, devices: int) -> dict:
    """Flower's Ray backend settings: ``client_cpus`` cores per virtual device, ``flower_cpus`` in all (default:
    every core), a share of the GPU per device when the simulation trains on one, Ray on 127.0.0.1 only."""
    total = cfg.flower_cpus or os.cpu_count() or 1
    parallel = max(1, min(devices, total // cfg.client_cpus))
    gpus = 1.0 / parallel if cfg.device.startswith("cuda") else 0.0
    init = {"num_cpus": total, "num_gpus": 1 if gpus else 0, "include_dashboard": False,
            "_node_ip_address": "127.0.0.1", "logging_level": "ERROR"}
    return {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": gpus}, "init_args": init}


def run_flower_simulation(cfg: SimConfig, strategy: str, seed: int, users: list[str]) -> dict:
    """One strategy x seed of a simulation on Flower's simulation engine: one virtual SuperNode per user.

    Returns:
        The run's record (the format of :func:`device_sdk.sim.runner.run_strategy`'s).

    Raises:
        SDKError: if the run ended without a record (a device or the server failed: see the log).
    """
    offline_env()
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    if cfg.device.startswith("cuda"):  # a Ray worker sees its share of a GPU as device 0
        cfg = replace(cfg, device="cuda")
    verbose = log.isEnabledFor(logging.DEBUG)
    if not verbose:  # Flower logs every message at DEBUG level, and Ray forwards its workers' warnings
        logging.getLogger("flwr").setLevel(logging.WARNING)
    backend = backend_config(cfg, len(users))
    backend["init_args"]["log_to_driver"] = verbose
    results: list[dict] = []
    # the virtual devices' checkpoints live only as long as the run: in memory where the system offers a tmpfs
    # (their fsyncs are then free; on a disk they are most of a tiny device's round)
    shm = Path("/dev/shm")
    memory = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="flower-devices-", dir=memory) as state:
        run = FlowerRun(sim=cfg, strategy=strategy, seed=seed, devices=len(users), state_root=state,
                        routing_report=True)
        run_simulation(server_app=make_server_app(run, results, threads=cfg.client_cpus), client_app=client_app,
                       num_supernodes=len(users), backend_name="ray", backend_config=backend,
                       verbose_logging=verbose)
    if not results:
        raise SDKError(f"the Flower simulation of {strategy} seed {seed} ended without a result; see the log above")
    return results[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackDeployment:
    """A SuperLink and one SuperNode per device on 127.0.0.1, each in its own process group (a context manager).

    Args:
        devices: each device's node config, e.g. ``{"data": "data/multilingual/de", "user": 0, "experts": 3,
            "state": "device-state/de"}`` (see :func:`device_sdk.flower.device.device_spec`).
        workdir: logs, Flower's home folder (``FLWR_HOME``: the CLI's connection settings, installed apps) and the
            SuperLink's working folder.
    """

    def __init__(self, devices: list[dict], workdir: Path, startup_s: float = 180.0) -> None:
        self.devices = devices
        self.workdir = Path(workdir)
        self.startup_s = startup_s
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    @property
    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # the SuperLink spawns flower-superexec from PATH
        return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.workdir / "flwr-home"),
                "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        exe = shutil.which(args[0], path=self.env["PATH"])
        if exe is None:
            raise SDKError(f"{args[0]} not found: install the [flower] extra (pip install -e '.[flower]')")
        log_file = open(self.workdir / f"{name}.log", "ab")  # the child keeps its own handle
        with log_file:
            proc = subprocess.Popen([exe, *args[1:]], cwd=self.workdir, env=self.env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LoopbackDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        self.port = free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            link = self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                             str(self.port), "--disable-runtime-dependency-installation"])
            self._wait_for_port(self.port, link, "superlink")
            for i, node in enumerate(self.devices):
                self._start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink",
                                              f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port",
                                              str(free_port()), "--node-config", node_config_arg(node)])
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_port(self, port: int, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SDKError(f"{name} exited on start (code {proc.returncode}): {self.log_tail(name)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise SDKError(f"{name} did not listen on 127.0.0.1:{port} within {self.startup_s:.0f} s: "
                       f"{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"

    def run(self, app_dir: Path, run_config: dict, timeout_s: float = 900.0) -> dict:
        """``flwr run APP loopback --run-config ...`` and wait for the run's record (the ServerApp writes it to the
        run config's ``out``, made absolute here).

        Raises:
            SDKError: if ``flwr run`` fails or no record appears within ``timeout_s``.
        """
        out = Path(run_config.get("out") or self.workdir / "record.json").resolve()
        out.unlink(missing_ok=True)
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in {**run_config, "out": str(out)}.items())
        flwr = shutil.which("flwr", path=self.env["PATH"])
        if flwr is None:
            raise SDKError("flwr not found: install the [flower] extra (pip install -e '.[flower]')")
        done = subprocess.run([flwr, "run", str(app_dir), "loopback", "--run-config", overrides], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SDKError(f"flwr run failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
        deadline = time.monotonic() + timeout_s
        while not out.is_file():
            if time.monotonic() > deadline:
                raise SDKError(f"no record at {out} after {timeout_s:.0f} s; SuperLink log: "
                               f"{self.log_tail('superlink')}")
            if any(p.poll() is not None for p in self.procs):
                raise SDKError(f"a Flower process exited during the run: {self.log_tail('superlink')}")
            time.sleep(0.5)
        return json.loads(out.read_text())  # complete: the ServerApp renames it into place

    def close(self) -> None:
        """SIGTERM to every process group we started (the SuperExec children with them), SIGKILL after 20 s."""
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # what is left of the group (children that outlived the leader)
            if proc.poll() is None:
                proc.wait()
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group led by our own child (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def node_config_arg(node: dict) -> str:
    """``--node-config`` text: strings quoted, numbers as they are."""
    return " ".join(f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in node.items())
