"""The aggregator as a real HTTP server: every bad upload gets its specific error and leaves the store unchanged."""

import hashlib
import json
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .server import ADMIN_TOKEN, ROOT, Server, admin_headers

SPEC = {"l0.attn.lora.lora_A": (8, 16), "l0.attn.lora.lora_B": (16, 8), "l0.mlp.experts.0.lora_A": (8, 16)}


def tensors(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {k: torch.full(shape, value) for k, shape in SPEC.items()}


def payload(t: dict, tokens: int = 100, metrics: dict | None = None) -> bytes:
    return st_save(t, metadata={"tokens": str(tokens), "metrics": json.dumps(metrics or {"valid_loss": 1.0})})


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "agg", max_upload_mb=0.01).start()
    yield srv
    srv.stop()


def setup_federation(url: str, min_devices: int = 2, deadline: float = 600.0) -> str:
    r = httpx.post(url + "/admin/federation", headers=admin_headers(), json={"config": {
        "base_model": "tiny-llama", "min_devices": min_devices, "round_deadline_s": deadline}})
    assert r.status_code == 201, r.text
    r2 = httpx.put(url + "/admin/federation/initial", headers=admin_headers(), content=st_save(tensors(0.5)))
    assert r2.status_code == 201, r2.text
    return r.json()["enroll_secret"]


def enroll(url: str, secret: str, name: str) -> dict:
    r = httpx.post(url + "/enroll", json={"enroll_secret": secret, "name": name,
                                          "capabilities": {"n_specialists": 1, "rank": 8}})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def store_snapshot(data_dir) -> dict:
    """Hashes of every committed file (database rows are checked through /status)."""
    return {str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((data_dir / "blobs").rglob("*.safetensors"))}


def test_every_body_is_bounded_before_a_route_or_an_auth_check_reads_it(server):
    from aggregator.body_limit import JSON_BODY_LIMIT

    url, data_dir = server.url, server.data_dir
    secret = setup_federation(url)
    d1 = enroll(url, secret, "d1")
    before = store_snapshot(data_dir)
    padding = "x" * (JSON_BODY_LIMIT + 1)
    huge_json = json.dumps({"enroll_secret": secret, "name": padding, "capabilities": {"n_specialists": 1, "rank": 8}})

    def streamed(data: bytes, piece: int = 4096):  # chunked transfer: no Content-Length to refuse early
        for start in range(0, len(data), piece):
            yield data[start:start + piece]

    refused = [
        httpx.post(url + "/enroll", content=huge_json, headers={"Content-Type": "application/json"}),
        httpx.post(url + "/enroll", content=streamed(huge_json.encode()), headers={"Content-Type": "application/json"}),
        httpx.post(url + "/admin/federation", content=huge_json, headers={"Content-Type": "application/json"}),
        httpx.post(url + "/rounds/1/update", headers=d1, content=streamed(b"\x00" * 20_000)),  # over max_upload_mb
    ]
    for r in refused:
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "payload_too_large" and "exceeds the limit" in r.json()["detail"]
    # an upload's token is checked before its body is read: no token, no bytes buffered
    anonymous = httpx.post(url + "/rounds/1/update", content=streamed(b"\x00" * 20_000))
    assert anonymous.status_code == 401, anonymous.text
    # a JSON body under its limit and an upload under max_upload_mb (10 KiB here, more than 64 KiB JSON is not) pass
    small = json.dumps({"enroll_secret": secret, "name": "d2", "capabilities": {"n_specialists": 1, "rank": 8}})
    assert httpx.post(url + "/enroll", content=streamed(small.encode(), 7),
                      headers={"Content-Type": "application/json"}).status_code == 201
    upload = httpx.post(url + "/rounds/1/update", headers=d1, content=streamed(payload(tensors(1.0)), 100))
    assert upload.status_code == 200, upload.text
    assert len(store_snapshot(data_dir)) == len(before) + 1
    assert httpx.get(url + "/status").json()["devices"] == 2


def test_the_admin_retires_a_device_that_every_round_would_wait_for(server):
    url = server.url
    secret = setup_federation(url, min_devices=1)
    d1, d2, ghost = (enroll(url, secret, name) for name in ("d1", "d2", "lost-state"))
    for headers in (d1, d2):
        assert httpx.post(f"{url}/rounds/1/update", headers=headers, content=payload(tensors(1.0))).status_code == 200
    assert httpx.get(url + "/status").json()["current_round"]["round"] == 1  # waits for the ghost: deadline 600 s
    assert httpx.delete(url + "/admin/devices/3").status_code == 401
    assert httpx.delete(url + "/admin/devices/3", headers=d1).status_code == 403
    def retire(device_id: int) -> subprocess.CompletedProcess:  # the operator's command
        return subprocess.run([sys.executable, "-m", "device_sdk", "retire-device", "--server", url, "--admin-token",
                               ADMIN_TOKEN, "--device-id", str(device_id), "--retries", "0"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    done = retire(3)
    assert done.returncode == 0, done.stderr
    retired = json.loads(done.stdout)
    assert retired["name"] == "lost-state" and retired["device_id"] == 3
    again = httpx.delete(url + "/admin/devices/3", headers=admin_headers())
    assert again.status_code == 200 and again.json() == retired
    missing = retire(99)
    assert missing.returncode == 2 and "device 99 does not exist" in missing.stderr
    status = httpx.get(url + "/status").json()
    assert status["current_round"]["round"] == 2 and status["devices"] == 2  # round 1 closed at once
    assert status["current_round"]["expected"] == 2
    assert httpx.get(url + "/rounds/current", headers=ghost).status_code == 401
    listed = httpx.get(url + "/status/devices").json()
    assert [d["retired_at"] is not None for d in listed] == [False, False, True]


def test_admin_and_enrollment_errors(server):
    url = server.url
    assert httpx.post(url + "/admin/federation", json={"config": {"base_model": "x"}}).status_code == 401
    r = httpx.get(url + "/rounds/current", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    secret = setup_federation(url)
    bad = httpx.post(url + "/enroll", json={"enroll_secret": "wrong-secret", "name": "d",
                                            "capabilities": {"n_specialists": 1, "rank": 8}})
    assert bad.status_code == 401 and "enrollment secret" in bad.json()["detail"]
    rank = httpx.post(url + "/enroll", json={"enroll_secret": secret, "name": "d",
                                             "capabilities": {"n_specialists": 1, "rank": 4}})
    assert rank.status_code == 422 and "rank 4" in rank.json()["detail"]
    for field, value in (("base_model", "gpt2"), ("strategy", "fedavg")):
        wrong = httpx.post(url + "/enroll", json={"enroll_secret": secret, "name": "d", "capabilities": {
            "n_specialists": 1, "rank": 8, field: value}})
        assert wrong.status_code == 422 and f"this device '{value}'" in wrong.json()["detail"]
    assert httpx.get(url + "/status").json()["devices"] == 0  # nothing enrolled by refused requests
    device = enroll(url, secret, "d1")
    forbidden = httpx.post(url + "/admin/federation", headers=device, json={"config": {"base_model": "x"}})
    assert forbidden.status_code == 403
    again = httpx.post(url + "/admin/federation", headers=admin_headers(), json={"config": {"base_model": "x"}})
    assert again.status_code == 409
    assert httpx.get(url + "/docs").status_code == 200
    assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "CoMiGS aggregator"


def test_bad_uploads_get_specific_errors_and_change_nothing(server):
    url, data_dir = server.url, server.data_dir
    secret = setup_federation(url, min_devices=2)
    d1, d2 = enroll(url, secret, "d1"), enroll(url, secret, "d2")
    good = tensors(1.0)
    nan = tensors(1.0)
    nan["l0.attn.lora.lora_B"][0, 0] = float("nan")
    inf = tensors(1.0)
    inf["l0.mlp.experts.0.lora_A"][1, 1] = float("inf")
    wrong_shape = {**good, "l0.attn.lora.lora_A": torch.zeros(8, 15)}
    wrong_dtype = {**good, "l0.attn.lora.lora_A": torch.zeros(8, 16, dtype=torch.float16)}
    extra_key = {**good, "l0.mlp.experts.1.lora_A": torch.zeros(8, 16)}  # a specialist must never be accepted
    missing_key = {k: v for k, v in good.items() if k != "l0.attn.lora.lora_B"}
    cases = [
        (d1, 1, payload(missing_key), 422, "missing key"),
        (d1, 1, payload(extra_key), 422, "unexpected key"),
        (d1, 1, payload(wrong_shape), 422, "shape"),
        (d1, 1, payload(wrong_dtype), 422, "dtype"),
        (d1, 1, payload(nan), 422, "NaN or Inf"),
        (d1, 1, payload(inf), 422, "NaN or Inf"),
        (d1, 1, payload(good)[:-7], 422, "not a valid safetensors"),
        (d1, 1, b"\x00" * 20_000, 413, "exceeds the limit"),
        ({}, 1, payload(good), 401, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, 1, payload(good), 401, "unknown device token"),
        (d1, 7, payload(good), 404, "does not exist"),
    ]
    before = store_snapshot(data_dir)
    for headers, number, body, status, message in cases:
        r = httpx.post(f"{url}/rounds/{number}/update", headers=headers, content=body)
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["detail"], (message, r.json())
        assert store_snapshot(data_dir) == before
        assert httpx.get(url + "/status").json()["current_round"]["reported"] == 0

    body = payload(good)
    ok = httpx.post(f"{url}/rounds/1/update", headers=d1, content=body)
    assert ok.status_code == 200 and ok.json() == {"round": 1, "duplicate": False, "reported": 1, "expected": 2}
    replay = httpx.post(f"{url}/rounds/1/update", headers=d1, content=body)
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    different = httpx.post(f"{url}/rounds/1/update", headers=d1, content=payload(tensors(2.0)))
    assert different.status_code == 409 and different.json()["error"] == "conflict"
    after_first = store_snapshot(data_dir)
    assert len(after_first) == len(before) + 1

    assert httpx.post(f"{url}/rounds/1/update", headers=d2, content=payload(tensors(3.0))).status_code == 200
    for _ in range(100):  # the round closes when every enrolled device reported
        if httpx.get(url + "/status").json()["current_round"]["round"] == 2:
            break
        import time

        time.sleep(0.05)
    late = httpx.post(f"{url}/rounds/1/update", headers=enroll(url, secret, "d3"), content=payload(good))
    assert late.status_code == 409 and late.json()["error"] == "round_closed"
    assert late.json()["extra"]["current_round"] == 2

    glob = st_load(httpx.get(f"{url}/globals/1", headers=d1).content)
    assert all(torch.equal(glob[k], torch.full(SPEC[k], 2.0)) for k in SPEC)  # mean of 1.0 and 3.0
    status = httpx.get(url + "/status").json()
    assert status["history"][0]["participants"] == [1, 2] and status["history"][0]["status"] == "closed"
    assert status["history"][0]["mean_metrics"] == {"valid_loss": 1.0}


def test_deadline_closes_a_round_with_whoever_reported(server):
    url = server.url
    secret = setup_federation(url, min_devices=1, deadline=1.0)
    d1 = enroll(url, secret, "d1")
    enroll(url, secret, "d2")  # never reports
    assert httpx.post(f"{url}/rounds/1/update", headers=d1, content=payload(tensors(4.0))).status_code == 200
    import time

    deadline = time.time() + 15
    while httpx.get(url + "/status").json()["current_round"]["round"] == 1:
        assert time.time() < deadline, "the round did not close after its deadline"
        time.sleep(0.1)
    history = httpx.get(url + "/status").json()["history"]
    assert history[0]["participants"] == [1]
