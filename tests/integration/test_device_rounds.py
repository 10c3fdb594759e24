"""A device (in-process, tiny model) against a real aggregator when a round fails: it waits for the admin instead of
training for a round that takes no uploads, and after the admin closes the round it trains from the last published
global again, not from its own trained tensors. When its upload cannot be sent, the next call sends it, and the
round is not trained again."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from device_sdk.client import AggregatorClient, RetryPolicy, ServerUnreachable
from device_sdk.config import TrainConfig
from device_sdk.device import Device, DeviceConfig, initial_shared_tensors
from device_sdk.checkpoint import latest_checkpoint
from device_sdk.errors import Cancelled, ConfigError
from device_sdk.train import router_parameters

from .lossy_proxy import LossyProxy
from .server import ADMIN_TOKEN, Server, admin_headers
from .test_aggregator_hardening import wait_status
from .test_federation import make_users


def _device(url: str, secret: str, data, state, cache, retry: RetryPolicy = RetryPolicy(), **settings) -> Device:
    train = TrainConfig(steps=2, batch_size=2, context=32, router_period=1, router_steps=1, precision="fp32")
    settings = {"n_specialists": 1, **settings}
    return Device(DeviceConfig(server=url, data=data, state_dir=state, enroll_secret=secret, train=train,
                               rounds=2, cache_dir=cache, eval_tokens=0, poll_s=0.05, retry=retry, **settings))


@contextmanager
def one_device_federation(tmp_path, min_devices: int = 1):
    """A real aggregator with a tiny-llama federation and one user folder: ``(url, secret, user, cache)``."""
    server = Server(tmp_path / "agg").start()
    try:
        cache = tmp_path / "cache"
        (user,) = make_users(tmp_path / "users", names=("de",))
        with AggregatorClient(server.url, ADMIN_TOKEN) as admin:
            secret = admin.create_federation({"base_model": "tiny-llama",
                                              "min_devices": min_devices})["enroll_secret"]
            admin.set_initial(initial_shared_tensors("tiny-llama", cache_dir=cache))
        yield server.url, secret, user, cache
    finally:
        server.stop()


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


def test_an_upload_that_cannot_be_sent_goes_out_with_the_next_call_and_the_round_is_not_trained_again(tmp_path):
    with one_device_federation(tmp_path, min_devices=1) as (url, secret, user, cache):
        state = tmp_path / "state"
        # the network is down for round 1's upload, past the client's retries
        with LossyProxy(url, ("/rounds/1/update",), lose=2, before=True) as proxy:
            device = _device(proxy.url, secret, user, state, cache, RetryPolicy(attempts=2, base_s=0.01))
            with pytest.raises(ServerUnreachable):
                device.run_round()
            assert proxy.lost["/rounds/1/update"] == 2
        current = httpx.get(url + "/status").json()["current_round"]
        assert (current["round"], current["reported"]) == (1, 0)  # the server never saw it
        steps = device.state.step
        assert steps == 2 and len(list(state.glob("pending-upload-*.safetensors"))) == 1

        # the app was killed; it starts again, with the network back
        again = _device(url, secret, user, state, cache)
        assert (again.last_round, again.completed_rounds, again.state.step) == (1, 1, steps)
        report = again.run_round()  # round 1's upload goes out first (it closes round 1), then round 2 trains
        assert (report.round, report.accepted) == (2, True)
        assert again.state.step == 2 * steps  # round 1 was not trained a second time
        assert again.completed_rounds == 2 and not list(state.glob("pending-upload-*"))
        wait_status(url, lambda s: s["current_round"]["round"] == 3)


def test_a_restarted_device_keeps_its_experts_whatever_its_budget_gives_now(tmp_path):
    with one_device_federation(tmp_path, min_devices=1) as (url, secret, user, cache):
        state = tmp_path / "state"
        assert _device(url, secret, user, state, cache).run_round().accepted  # 1 specialist
        saved = latest_checkpoint(state / "checkpoints") / "state.json"  # as a checkpoint from before n_experts
        saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "n_experts"}))
        # the app starts again and sizes the device from the memory free now: far more specialists would fit
        again = _device(url, secret, user, state, cache, n_specialists=None, budget_mb=1e6)
        assert again.n_experts == 2 and again.adapter.n_specialists == 1 and again.completed_rounds == 1
        assert again.budget.n_specialists > 1  # what the budget gave, kept for the app to see
        tight = _device(url, secret, user, state, cache, n_specialists=None, budget_mb=1)  # below the base model
        assert tight.n_experts == 2 and tight.completed_rounds == 1
        with pytest.raises(ConfigError, match="holds a device with 1 specialist.*n_specialists=3 asks for another"):
            _device(url, secret, user, state, cache, n_specialists=3)


def test_an_app_stops_a_round_midway_and_the_device_is_back_at_its_checkpoint(tmp_path):
    """The app's stop event ends training at a step boundary (Cancelled), the device back at its last checkpoint
    with nothing sent; the next call trains the round from the start; a wait ends at its next poll."""
    with one_device_federation(tmp_path, min_devices=2) as (url, secret, user, cache):  # round 1 stays open
        state = tmp_path / "state"
        device = _device(url, secret, user, state, cache)
        before = {k: v.clone() for k, v in device.model.state_dict().items() if "lora" in k}
        stop, seen = threading.Event(), []

        def app_goes_to_background(stats):
            seen.append((stats["done"], stats["of"]))
            stop.set()

        with pytest.raises(Cancelled, match="stopped in round 1 at step 1 of 2"):
            device.run_round(stop=stop, on_step=app_goes_to_background)
        assert seen == [(1, 2)] and device.state.step == 0 and device.completed_rounds == 0
        assert all(torch.equal(v, device.model.state_dict()[k]) for k, v in before.items())
        assert not device.state.expert_opt.state  # no moments of the stopped steps, as in the checkpoint
        assert all(p.requires_grad for p in router_parameters(device.model)) and not device.model.training
        assert httpx.get(url + "/status").json()["current_round"]["reported"] == 0

        report = device.run_round(on_step=lambda stats: seen.append((stats["done"], stats["of"])))
        assert report.round == 1 and report.accepted and device.state.step == 2
        assert seen == [(1, 2), (1, 2), (2, 2)]
        stop.set()
        started = time.monotonic()
        with pytest.raises(Cancelled, match="waiting"):
            device.final_sync(stop)  # round 1 waits for a second device
        assert time.monotonic() - started < 5


def test_an_upload_the_server_refuses_is_dropped_not_sent_again_forever(tmp_path):
    with one_device_federation(tmp_path) as (url, secret, user, cache):
        state = tmp_path / "state"
        with LossyProxy(url, ("/rounds/1/update",), lose=2, before=True) as proxy:
            device = _device(proxy.url, secret, user, state, cache, RetryPolicy(attempts=2, base_s=0.01))
            with pytest.raises(ServerUnreachable):
                device.run_round()
        (pending,) = state.glob("pending-upload-*.safetensors")
        pending.write_bytes(b"damaged on disk")
        again, stop = _device(url, secret, user, state, cache), threading.Event()
        stop.set()
        with pytest.raises(Cancelled):  # the flush meets 422 and drops the file; the wait for round 2 is stopped
            again.run_round(stop=stop)
        assert not list(state.glob("pending-upload-*")) and again.completed_rounds == 1
