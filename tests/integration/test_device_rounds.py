"""A device (in-process, tiny model) against a real aggregator when a round fails: it waits for the admin instead of
training for a round that takes no uploads, and after the admin closes the round it trains from the last published
global again, not from its own trained tensors."""

from __future__ import annotations

import threading
import time

import httpx

from device_sdk.client import AggregatorClient
from device_sdk.config import TrainConfig
from device_sdk.device import Device, DeviceConfig, initial_shared_tensors

from .server import ADMIN_TOKEN, Server, admin_headers
from .test_aggregator_hardening import wait_status
from .test_federation import make_users


def _device(url: str, secret: str, data, state, cache) -> Device:
    train = TrainConfig(steps=2, batch_size=2, context=32, router_period=1, router_steps=1, precision="fp32")
    return Device(DeviceConfig(server=url, data=data, state_dir=state, enroll_secret=secret, train=train,
                               rounds=2, n_specialists=1, cache_dir=cache, eval_tokens=0, poll_s=0.05))


def _downloads(device: Device) -> list[int]:
    """Record the global versions the device downloads (the real download runs)."""
    seen: list[int] = []
    real = device.client.download_global

    def recording(version: int):
        seen.append(version)
        return real(version)

    device.client.download_global = recording
    return seen


def test_a_device_waits_out_a_failed_round_and_restarts_from_the_last_published_global(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        url, cache = server.url, tmp_path / "cache"
        users = make_users(tmp_path / "users", names=("de", "nl"))
        with AggregatorClient(url, ADMIN_TOKEN) as admin:
            secret = admin.create_federation({"base_model": "tiny-llama", "min_devices": 1})["enroll_secret"]
            admin.set_initial(initial_shared_tensors("tiny-llama", cache_dir=cache))
        first = _device(url, secret, users[0], tmp_path / "state-de", cache)
        first_downloads = _downloads(first)
        (server.data_dir / "blobs" / "globals" / "v000001.safetensors").mkdir(parents=True)  # round 1's global fails
        assert first.run_round().accepted  # min_devices 1: its upload closes round 1, which fails
        wait_status(url, lambda s: s["current_round"]["status"] == "failed")

        late = _device(url, secret, users[1], tmp_path / "state-nl", cache)  # never reported in round 1
        reports = []
        waiter = threading.Thread(target=lambda: reports.append(late.run_round()), daemon=True)
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and not reports  # waiting for the admin, not training for the failed round
        assert httpx.get(url + "/status").json()["current_round"]["reported"] == 1

        closed = httpx.post(url + "/admin/rounds/1/close", headers=admin_headers())
        assert (closed.json()["round"], closed.json()["base_version"]) == (2, 0)
        waiter.join(timeout=120)
        assert reports and (reports[0].round, reports[0].accepted) == (2, True)

        second = first.run_round()
        assert (second.round, second.accepted) == (2, True)
        assert first_downloads == [0, 0]  # round 2 starts again from global 0, not from round 1's own training
    finally:
        server.stop()
