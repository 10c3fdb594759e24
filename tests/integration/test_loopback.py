"""Starting real aggregators on loopback: the server picks its port, so servers started at once never collide."""

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from device_sdk.errors import SDKError
from device_sdk.loopback import start_aggregator, stop_aggregator


def test_servers_started_at_once_bind_ports_of_their_own(tmp_path):
    env = {"AGGREGATOR_ADMIN_TOKEN": "x" * 24}
    with ThreadPoolExecutor(3) as pool:
        started = list(pool.map(lambda i: start_aggregator(tmp_path / f"agg{i}", tmp_path / f"agg{i}.log",
                                                           {**os.environ, **env}), range(3)))
    try:
        ports = [port for _, port in started]
        assert len(set(ports)) == 3 and all(p > 0 for p in ports)
        for i, port in enumerate(ports):  # each answers from its own folder
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            assert (tmp_path / f"agg{i}").is_dir() and not list((tmp_path / f"agg{i}").glob(".port-*"))
    finally:
        for proc, _ in started:
            stop_aggregator(proc)
    assert all(proc.poll() is not None for proc, _ in started)


def test_a_port_in_use_fails_with_the_servers_log(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SDKError, match=r"(?s)exited on start .*address already in use"):
            start_aggregator(tmp_path / "agg", tmp_path / "agg.log", port=busy.getsockname()[1], startup_s=60)
