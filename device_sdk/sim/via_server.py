"""Run a simulation's rounds through a real aggregator process on loopback (``simulate --via-server``).

Each simulated device enrolls with its own bearer token and uploads its shared tensors over HTTP; the server
validates, stores and aggregates them exactly as in a deployment (the strategy's server rule), and every device
downloads the new global version. The aggregator and the in-process run call the same functions of
:mod:`device_sdk.federated` (the streaming mean is :class:`~device_sdk.federated.RunningMean`, which
:func:`~device_sdk.federated.mean` runs too), so the results equal the in-process run for the same seed (tested).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..client import AggregatorClient
from ..config import AdapterConfig
from ..errors import ConfigError, SDKError
from ..federated import Upload
from ..federated.roles import role_names
from ..loopback import start_aggregator, stop_aggregator
from ..strategies import Strategy

log = logging.getLogger(__name__)


class LoopbackAggregator:
    """``python -m aggregator serve`` in a temporary data folder on a free loopback port (a context manager)."""

    def __init__(self, startup_s: float = 120.0) -> None:
        self.startup_s = startup_s
        self.admin_token = secrets.token_urlsafe(24)
        self.port: int | None = None  # bound on start
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LoopbackAggregator:
        self._tmp = tempfile.TemporaryDirectory(prefix="sim-aggregator-")
        folder = Path(self._tmp.name)
        env = {**os.environ, "AGGREGATOR_ADMIN_TOKEN": self.admin_token, "AGGREGATOR_TICK_S": "0.1"}
        self.log_path = folder / "aggregator.log"
        try:
            self.proc, self.port = start_aggregator(folder / "data", self.log_path, env, startup_s=self.startup_s)
        except SDKError:
            self._tmp.cleanup()
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_aggregator(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()


class ServerRounds:
    """The server side of a simulated federation: one enrolled client per device.

    Args:
        server: a running aggregator.
        strategy: a collaborative strategy (the server runs its rule).
        rank: one expert's LoRA rank (the federation's ``rank``).
        initial: the common initial shared tensors (global version 0) at the largest shapes; they fix the
            federation's key set.
        devices: ``(name, AdapterConfig)`` of every simulated device (declared as its capabilities).
    """

    def __init__(self, server: LoopbackAggregator, strategy: Strategy, base_model: str, rank: int, alpha: float,
                 initial: dict[str, torch.Tensor], devices: list[tuple[str, AdapterConfig]],
                 timeout_s: float = 600.0) -> None:
        if not strategy.collaborative:
            raise ConfigError(f"{strategy.name} shares nothing through a server; it runs in-process only")
        self.timeout_s = timeout_s
        admin = AggregatorClient(server.url, token=server.admin_token)
        config = {"base_model": base_model, "rank": rank, "alpha": alpha, "min_devices": len(devices),
                  "round_deadline_s": timeout_s, "aggregation": "mean",
                  "shared_roles": role_names(strategy.shared_roles), "strategy": strategy.name}
        secret = admin.create_federation(config)["enroll_secret"]
        admin.set_initial(initial)
        admin.close()
        self.clients = []
        for name, adapter in devices:
            client = AggregatorClient(server.url)
            capabilities = {"n_specialists": adapter.n_specialists, "n_generalists": adapter.n_generalists,
                            "rank": adapter.rank}
            client.token = client.enroll(secret, name, capabilities)["token"]
            self.clients.append(client)
        self.round = 1

    def exchange(self, uploads: list[Upload]) -> list[dict[str, torch.Tensor]]:
        """Upload every device's tensors for the current round, wait for it to close, return the new global
        version as each device downloads it."""
        for client, upload in zip(self.clients, uploads):
            client.upload(self.round, upload.tensors, upload.tokens, {})
        deadline = time.time() + self.timeout_s
        while self.clients[0].current_round()["round"] <= self.round:
            if time.time() > deadline:
                raise SDKError(f"round {self.round} did not close within {self.timeout_s:.0f} s")
            time.sleep(0.05)
        version = self.round
        self.round += 1
        return [client.download_global(version) for client in self.clients]

    def close(self) -> None:
        for client in self.clients:
            client.close()
