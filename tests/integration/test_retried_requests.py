"""Every call a client retries is answered as the first: an answer lost on the network (a real proxy that drops it
after the real server handled the request), a crash between the server's answer and the device's credentials file,
and concurrent repeats never make a second federation, a 409, or a second device."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from device_sdk.client import AggregatorClient, RetryPolicy
from device_sdk.enrollment import CREDENTIALS, PENDING, credentials
from device_sdk.errors import ConfigError
from device_sdk.federated import wire

from .lossy_proxy import LossyProxy
from .server import ADMIN_TOKEN, admin_headers

CONFIG = {"base_model": "tiny-llama", "min_devices": 2}
CAPABILITIES = {"n_specialists": 1, "rank": 8}
SECRET = "enroll-secret-0123456789abcdef"
FAST = RetryPolicy(attempts=4, base_s=0.05)


def initial(value: float = 0.5) -> dict[str, torch.Tensor]:
    return {"l0.attn.lora.lora_A": torch.full((8, 16), value), "l0.attn.lora.lora_B": torch.full((16, 8), value)}


def test_setup_enrollment_and_upload_survive_lost_answers(server, tmp_path):
    paths = ("/admin/federation", "/admin/federation/initial", "/enroll", "/rounds/1/update")
    with LossyProxy(server.url, paths) as proxy, AggregatorClient(proxy.url, ADMIN_TOKEN, FAST) as admin:
        secret = admin.create_federation(CONFIG)["enroll_secret"]  # the client picked it: the retry repeats it
        assert admin.set_initial(initial()) == {"tensors": 2, "round": 1}
        state = tmp_path / "device"
        state.mkdir()
        found = credentials(proxy.url, state, secret, "d1", CAPABILITIES, FAST)
        device = AggregatorClient(proxy.url, found["token"], FAST)
        assert device.upload(1, initial(1.0), 100, {"valid_loss": 1.0})["duplicate"] is True  # the retry's answer
        assert proxy.lost == dict.fromkeys(paths, 1)  # every answer was lost once, and every call still succeeded

    status = httpx.get(server.url + "/status").json()
    assert status["devices"] == 1 and status["current_round"]["reported"] == 1
    assert json.loads((state / CREDENTIALS).read_text())["device_id"] == found["device_id"]
    assert not (state / PENDING).exists()


def test_a_crash_after_the_server_enrolled_the_device_leaves_one_device(server, tmp_path):
    with AggregatorClient(server.url, ADMIN_TOKEN) as admin:
        admin.create_federation(CONFIG, SECRET)
        admin.set_initial(initial())
    state = tmp_path / "device"
    state.mkdir()
    (state / PENDING).write_text(json.dumps({"token": "t" * 43}))  # written before the request that reached the server
    with AggregatorClient(server.url) as client:
        first = client.enroll(SECRET, "d1", CAPABILITIES, token="t" * 43)  # ... whose answer the crash lost
    assert credentials(server.url, state, SECRET, "d1", CAPABILITIES)["device_id"] == first["device_id"]
    assert httpx.get(server.url + "/status").json()["devices"] == 1

    other = tmp_path / "other"  # a pending enrollment whose settings changed before the restart
    other.mkdir()
    (other / PENDING).write_text(json.dumps({"token": "u" * 43}))
    with AggregatorClient(server.url) as client:
        client.enroll(SECRET, "d2", CAPABILITIES, token="u" * 43)
    with pytest.raises(ConfigError, match=f"reached the aggregator with other settings.*delete {other / PENDING}"):
        credentials(server.url, other, SECRET, "d2", {"n_specialists": 2, "rank": 8})
    assert httpx.get(server.url + "/status").json()["devices"] == 2


def test_repeats_answer_as_the_first_and_concurrent_setups_store_one_consistent_federation(server):
    url = server.url
    create = {"config": CONFIG, "enroll_secret": SECRET}
    for _ in range(2):
        r = httpx.post(url + "/admin/federation", headers=admin_headers(), json=create)
        assert r.status_code == 201 and r.json()["enroll_secret"] == SECRET, r.text
    for changed in ({"config": {**CONFIG, "min_devices": 3}, "enroll_secret": SECRET},
                    {"config": CONFIG, "enroll_secret": SECRET + "x"}, {"config": CONFIG}):
        assert httpx.post(url + "/admin/federation", headers=admin_headers(), json=changed).status_code == 409

    payloads = [wire.encode(initial(float(i))) for i in range(6)]  # six admins race with different tensors
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: httpx.put(url + "/admin/federation/initial", headers=admin_headers(),
                                                    content=p, timeout=30), payloads))
    assert sorted(a.status_code for a in answers) == [201] + [409] * 5, [a.text for a in answers]
    winner = payloads[next(i for i, a in enumerate(answers) if a.status_code == 201)]
    repeat = httpx.put(url + "/admin/federation/initial", headers=admin_headers(), content=winner)
    assert repeat.status_code == 201 and repeat.json() == {"tensors": 2, "round": 1}

    enroll = {"enroll_secret": SECRET, "name": "d1", "capabilities": CAPABILITIES, "token": "v" * 43}
    with ThreadPoolExecutor(6) as pool:
        enrolled = list(pool.map(lambda _: httpx.post(url + "/enroll", json=enroll, timeout=30), range(6)))
    assert {(e.status_code, e.json()["device_id"], e.json()["token"]) for e in enrolled} == {(201, 1, "v" * 43)}
    assert httpx.post(url + "/enroll", json={**enroll, "name": "d2"}).status_code == 409
    assert httpx.post(url + "/enroll", json={**enroll, "token": "short"}).status_code == 422
    assert httpx.get(url + "/status").json()["devices"] == 1

    stored = httpx.get(url + "/globals/0", headers={"Authorization": "Bearer " + "v" * 43})
    assert stored.content == winner and hashlib.sha256(stored.content).hexdigest() == stored.headers["X-Sha256"]
