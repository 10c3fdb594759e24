"""A server no device can break (issue 11), on a real aggregator over loopback: uploads the round's rule could not use
are refused up front, racing replays store one upload and no orphan file, out-of-range numbers get 4xx, a round whose
aggregation fails is visible, survives a restart and is retried or closed by the admin, one server per data folder,
no weak secrets."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .server import ADMIN_TOKEN, ROOT, Server, admin_headers

SPEC = {"l0.attn.lora.lora_A": (8, 16), "l0.attn.lora.lora_B": (16, 8), "l0.mlp.experts.0.lora_A": (8, 16)}
SECRET = "hardening-enroll-secret-0123456789"


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(shape, value) for k, shape in SPEC.items()}


def payload(t: dict, tokens: int | str = 100, metrics: str = '{"valid_loss": 1.0}') -> bytes:
    return st_save(t, metadata={"tokens": str(tokens), "metrics": metrics})


def reserialised(body: bytes) -> bytes:
    """The same tensors and metadata with every header key in reverse order (other bytes, same content)."""
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + n])
    meta = header.pop("__metadata__")
    out = dict(reversed(list(header.items())))
    out["__metadata__"] = dict(reversed(list(meta.items())))
    raw = json.dumps(out).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body[8 + n:]


def create(url: str, config: dict, initial: dict[str, torch.Tensor], secret: str = SECRET) -> None:
    r = httpx.post(url + "/admin/federation", headers=admin_headers(), json={"config": config, "enroll_secret": secret})
    assert r.status_code == 201, r.text
    r = httpx.put(url + "/admin/federation/initial", headers=admin_headers(), content=st_save(initial))
    assert r.status_code == 201, r.text


def enroll(url: str, name: str, rank: int = 8) -> dict:
    r = httpx.post(url + "/enroll", json={"enroll_secret": SECRET, "name": name,
                                          "capabilities": {"n_specialists": 1, "rank": rank}})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def upload(url: str, headers: dict, number: int, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/rounds/{number}/update", headers=headers, content=body, timeout=30)


def wait_status(url: str, check, timeout_s: float = 20.0) -> dict:
    deadline = time.time() + timeout_s
    while True:
        status = httpx.get(url + "/status").json()
        if check(status):
            return status
        assert time.time() < deadline, f"timed out waiting; last /status: {status}"
        time.sleep(0.05)


def blob_files(data_dir) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blobs" / "updates").rglob("*") if p.is_file())


def race(url: str, headers: dict, bodies: list[bytes]) -> list[httpx.Response]:
    """Send ``bodies`` for round 1 at the same moment, one thread each."""
    barrier, answers = threading.Barrier(len(bodies)), []

    def send(body: bytes) -> None:
        barrier.wait()
        answers.append(upload(url, headers, 1, body))

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_refused_inputs_races_and_replays_in_a_token_weighted_federation(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        url, data_dir = server.url, server.data_dir
        weak = httpx.post(url + "/admin/federation", headers=admin_headers(),
                          json={"config": {"base_model": "tiny-llama"}, "enroll_secret": "short-secret"})
        assert weak.status_code == 422 and "token_urlsafe" in weak.json()["detail"]
        assert httpx.get(url + "/status").json()["config"] is None  # nothing created
        create(url, {"base_model": "tiny-llama", "aggregation": "token_weighted", "min_devices": 2}, tensors(0.0))
        d1, d2, d3, d4 = (enroll(url, f"d{i}") for i in range(1, 5))

        refused = [
            (payload(tensors(1.0), tokens=0), "positive token count, got 0"),
            (st_save(tensors(1.0)), "positive token count, got 0"),  # no metadata
            (payload(tensors(1.0), tokens=2**63), "'tokens' must be a decimal integer"),
            (payload(tensors(1.0), tokens=10**30), "'tokens' must be a decimal integer"),
            (payload(tensors(1.0), metrics='{"valid_loss": NaN}'), "finite numbers"),
            (payload(tensors(1.0), metrics='{"valid_loss": 1e400}'), "finite numbers"),
            (payload(tensors(1.0), metrics='{"valid_loss": %d}' % 10**400), "magnitude at most"),
            (payload(tensors(1.0), metrics='{"valid_loss": %d}' % 2**63), "magnitude at most"),
            (payload(tensors(2e4)), "max_abs_value=10000"),
        ]
        for body, message in refused:
            r = upload(url, d1, 1, body)
            assert r.status_code == 422, (message, r.text)
            assert set(r.json()) == {"error", "detail", "extra"} and message in r.json()["detail"], r.json()
        huge_round = upload(url, d1, 2**70, payload(tensors(1.0)))
        assert 400 <= huge_round.status_code < 500, huge_round.text
        assert blob_files(data_dir) == [] and httpx.get(url + "/status").json()["current_round"]["reported"] == 0

        same = race(url, d1, [payload(tensors(1.0), tokens=100)] * 2)
        assert sorted(r.status_code for r in same) == [200, 200], [r.text for r in same]
        assert sorted(r.json()["duplicate"] for r in same) == [False, True]
        different = race(url, d2, [payload(tensors(2.0), tokens=100), payload(tensors(9.0), tokens=100)])
        assert sorted(r.status_code for r in different) == [200, 409], [r.text for r in different]
        winner = next(r for r in different if r.status_code == 200)
        assert winner.json()["duplicate"] is False

        body = payload(tensors(3.0), tokens=300)
        again = reserialised(body)
        assert again != body and st_load(again).keys() == st_load(body).keys()
        assert upload(url, d3, 1, body).json()["duplicate"] is False
        replay = upload(url, d3, 1, again)
        assert replay.status_code == 200 and replay.json()["duplicate"] is True
        assert len(blob_files(data_dir)) == 3  # one per accepted upload: no orphan from races or replays

        assert upload(url, d4, 1, payload(tensors(4.0), tokens=500)).status_code == 200
        status = wait_status(url, lambda s: s["current_round"]["round"] == 2)
        assert status["history"][0]["status"] == "closed" and status["history"][0]["failure"] is None
        d2_blob = next((data_dir / "blobs" / "updates" / "r000001").glob("d000002-*"))  # the race's winner
        d2_value = float(st_load(d2_blob.read_bytes())["l0.attn.lora.lora_A"][0, 0])
        assert d2_value in (2.0, 9.0)
        expected = (1.0 * 100 + d2_value * 100 + 3.0 * 300 + 4.0 * 500) / 1000
        glob = st_load(httpx.get(f"{url}/globals/1", headers=d1).content)
        assert all(torch.allclose(glob[k], torch.full(SPEC[k], expected)) for k in SPEC)
    finally:
        server.stop()


def test_a_failed_round_is_visible_survives_a_restart_and_the_admin_retries_or_closes_it(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        url, data_dir = server.url, server.data_dir
        create(url, {"base_model": "tiny-llama", "min_devices": 1}, tensors(0.0))
        devices = [enroll(url, f"d{i}") for i in range(2)]
        blocker = data_dir / "blobs" / "globals" / "v000001.safetensors"
        blocker.mkdir(parents=True)  # the new global cannot be written: a real I/O failure
        for i, headers in enumerate(devices):
            assert upload(url, headers, 1, payload(tensors(float(i)))).status_code == 200
        status = wait_status(url, lambda s: s["current_round"]["status"] == "failed")
        assert "IsADirectoryError" in status["current_round"]["failure"]
        assert status["history"][0]["failure"] == status["current_round"]["failure"]
        late_device = enroll(url, "late")
        late = upload(url, late_device, 1, payload(tensors(1.0)))
        assert late.status_code == 409 and late.json()["error"] == "round_closed"
        assert "failed to aggregate" in late.json()["detail"]

        server.stop()
        server.start()  # starts and serves with a failed round
        assert httpx.get(url + "/status").json()["current_round"]["status"] == "failed"
        assert httpx.post(url + "/admin/rounds/1/retry").status_code == 401
        still = httpx.post(url + "/admin/rounds/1/retry", headers=admin_headers(), timeout=30)
        assert still.status_code == 200 and still.json()["status"] == "failed", still.text
        blocker.rmdir()
        retried = httpx.post(url + "/admin/rounds/1/retry", headers=admin_headers(), timeout=30)
        assert retried.status_code == 200, retried.text
        assert (retried.json()["round"], retried.json()["status"], retried.json()["base_version"]) == (2, "open", 1)
        glob = st_load(httpx.get(f"{url}/globals/1", headers=devices[0]).content)
        assert all(torch.equal(glob[k], torch.full(SPEC[k], 0.5)) for k in SPEC)

        (data_dir / "blobs" / "globals" / "v000002.safetensors").mkdir()
        for headers in devices + [late_device]:
            assert upload(url, headers, 2, payload(tensors(7.0))).status_code == 200
        wait_status(url, lambda s: s["current_round"]["status"] == "failed")
        closed = httpx.post(url + "/admin/rounds/2/close", headers=admin_headers())
        assert closed.status_code == 200, closed.text
        assert (closed.json()["round"], closed.json()["status"], closed.json()["base_version"]) == (3, "open", 1)
        history = httpx.get(url + "/status").json()["history"]
        assert history[1]["status"] == "failed" and "closed by the admin" in history[1]["failure"]
        assert httpx.post(url + "/admin/rounds/2/retry", headers=admin_headers()).status_code == 409
        assert httpx.post(url + "/admin/rounds/99/close", headers=admin_headers()).status_code == 404
        assert upload(url, devices[0], 3, payload(tensors(1.0))).status_code == 200  # the federation goes on
    finally:
        server.stop()


def test_a_nan_global_fails_the_round_and_a_second_server_on_the_folder_refuses_to_start(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        url = server.url
        create(url, {"base_model": "tiny-llama", "strategy": "hetlora-full", "min_devices": 2,
                     "max_abs_value": 1e30}, {"m.lora_A": torch.zeros(16, 4), "m.lora_B": torch.zeros(3, 16)})
        huge = {"m.lora_A": torch.full((16, 4), 1e20), "m.lora_B": torch.full((3, 16), 1e20)}  # finite
        for name in ("a", "b"):
            assert upload(url, enroll(url, name, rank=16), 1, payload(huge)).status_code == 200
        status = wait_status(url, lambda s: s["current_round"]["status"] == "failed")
        assert "NaN or Inf" in status["current_round"]["failure"]

        env = {**os.environ, "AGGREGATOR_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONPATH": str(ROOT)}
        second = subprocess.run([sys.executable, "-m", "aggregator", "serve", "--data-dir", str(server.data_dir),
                                 "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "another aggregator is already serving the data directory" in second.stderr
        assert str(server.data_dir.resolve()) in second.stderr

        closed = httpx.post(url + "/admin/rounds/1/close", headers=admin_headers())
        assert (closed.json()["round"], closed.json()["base_version"]) == (2, 0)  # devices train on global 0 again
    finally:
        server.stop()

    weak = subprocess.run([sys.executable, "-m", "aggregator", "serve", "--data-dir", str(tmp_path / "other")],
                          env={**os.environ, "AGGREGATOR_ADMIN_TOKEN": "weak-token-123", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert weak.returncode == 2 and "at least 22" in weak.stderr and "token_urlsafe" in weak.stderr
    assert "weak-token-123" not in weak.stderr
