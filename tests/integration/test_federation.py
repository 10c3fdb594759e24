"""Algorithm 1 end to end: a real aggregator and real device processes with tiny models; crashes on both sides."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from device_sdk.adapters import read_adapter_file
from device_sdk.checkpoint import latest_checkpoint

from .server import ADMIN_TOKEN, ROOT, Server

SHARED = ROOT.parent / "shared" / "data" / "multilingual"


def make_users(root: Path, names=("de", "fr", "nl")) -> list[Path]:
    """Small user folders: slices of the real per-user text when ../shared is there, generated text otherwise."""
    folders = []
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        for split in ("train", "valid", "test"):
            source = SHARED / name / f"{split}.txt.gz"
            if source.is_file():
                text = gzip.open(source, "rt", encoding="utf-8").read(40_000 if split == "train" else 8_000)
            else:
                words = [f"w{i}{j}" for j in range(40)]
                text = "\n".join(" ".join(words[(k * 7 + j) % 40] for j in range(12)) for k in range(300))
            (folder / f"{split}.txt").write_text(text)
        folders.append(folder)
    return folders


def env() -> dict:
    # One thread per process: several tiny-model processes share the cores, and threads only add contention there.
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def init_federation(url: str, *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", "device_sdk", "init-federation", "--server", url, "--admin-token",
                           ADMIN_TOKEN, "--model", "tiny-llama", "--min-devices", "3", *extra], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["enroll_secret"]


def start_device(url: str, secret: str, data: Path, state: Path, specialists: int, cache: Path, rounds: int = 3,
                 steps: int = 4, seed: int = 0, *extra: str) -> subprocess.Popen:
    log = open(state.parent / f"{state.name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "device_sdk", "join", "--server", url, "--data", str(data), "--state", str(state),
         "--enroll-secret", secret, "--specialists", str(specialists), "--rounds", str(rounds), "--local-steps",
         str(steps), "--model", "tiny-llama", "--batch", "4", "--ctx", "32", "--router-period", "2",
         "--router-steps", "1", "--precision", "fp32", "--seed", str(seed), "--cache-dir", str(cache), *extra],
        env=env(), stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], states: list[Path], timeout: float = 300) -> None:
    for proc, state in zip(procs, states):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, (state.parent / f"{state.name}.log").read_text()[-3000:]


def status(url: str) -> dict:
    return httpx.get(url + "/status", timeout=10).json()


def shared_of_checkpoint(state: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(state / "checkpoints")
    out = {}
    for role in ("attention", "generalist"):
        out.update(read_adapter_file(ckpt / "adapters" / f"{role}.safetensors")[0])
    return out


def check_federation(server: Server, states: list[Path], rounds: int) -> None:
    """Every closed round's global is the exact mean of its stored uploads; devices hold the last global; uploads
    hold shared tensors only; specialists and routers stay different per device."""
    data = server.data_dir
    history = status(server.url)["history"]
    closed = [h for h in history if h["status"] == "closed"]
    assert [h["round"] for h in closed] == list(range(1, rounds + 1))
    assert all(sorted(h["participants"]) == [1, 2, 3] for h in closed)
    spec_keys = set(load_file(str(data / "blobs" / "globals" / "v000000.safetensors")))
    assert not any(".experts.1." in k or "router" in k for k in spec_keys)
    for h in closed:
        uploads = sorted((data / "blobs" / "updates" / f"r{h['round']:06d}").glob("*.safetensors"))
        assert len(uploads) == 3
        tensors = [load_file(str(p)) for p in uploads]
        assert all(set(t) == spec_keys for t in tensors)  # nothing but shared tensors ever reached the server
        glob = load_file(str(data / "blobs" / "globals" / f"v{h['round']:06d}.safetensors"))
        for k in spec_keys:
            expected = (sum(t[k].double() for t in tensors) / 3).float()
            assert torch.equal(glob[k], expected), k
    last = load_file(str(data / "blobs" / "globals" / f"v{rounds:06d}.safetensors"))
    for state in states:
        held = shared_of_checkpoint(state)
        assert held.keys() == last.keys() and all(torch.equal(held[k], last[k]) for k in last), state
    spec2 = read_adapter_file(latest_checkpoint(states[1] / "checkpoints") / "adapters" / "specialist.safetensors")[0]
    spec4 = read_adapter_file(latest_checkpoint(states[2] / "checkpoints") / "adapters" / "specialist.safetensors")[0]
    key = next(k for k in spec2 if ".experts.1.lora_B" in k)
    assert not torch.equal(spec2[key], spec4[key])
    assert not (latest_checkpoint(states[0] / "checkpoints") / "adapters" / "specialist.safetensors").exists()


@pytest.fixture
def federation(tmp_path):
    server = Server(tmp_path / "agg").start()
    users = make_users(tmp_path / "users")
    secret = init_federation(server.url)
    states = [tmp_path / f"state-{u.name}" for u in users]
    yield server, users, secret, states
    server.stop()


def test_three_devices_with_1_2_4_experts_run_three_rounds(federation, tmp_path):
    server, users, secret, states = federation
    procs = [start_device(server.url, secret, u, s, n, tmp_path / "cache", seed=i)
             for i, (u, s, n) in enumerate(zip(users, states, (0, 1, 3)))]
    wait_all(procs, states)
    check_federation(server, states, rounds=3)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_server_sigkill_mid_round_loses_nothing(federation, tmp_path):
    server, users, secret, states = federation
    procs = [start_device(server.url, secret, u, s, n, tmp_path / "cache", seed=i)
             for i, (u, s, n) in enumerate(zip(users, states, (0, 1, 3)))]
    _wait_until(lambda: (status(server.url)["current_round"] or {}).get("round", 0) >= 2
                and status(server.url)["current_round"]["reported"] >= 1, 240, "a report in round 2")
    accepted_before = [h for h in status(server.url)["history"] if h["participants"]]
    server.kill()
    time.sleep(1.0)
    server.start()
    after = status(server.url)["history"]
    for h in accepted_before:  # every accepted upload and closed round survived
        match = next(x for x in after if x["round"] == h["round"])
        assert set(h["participants"]) <= set(match["participants"])
    wait_all(procs, states)
    check_federation(server, states, rounds=3)


def test_device_sigkill_mid_training_resumes(federation, tmp_path):
    server, users, secret, states = federation
    # The kill waits for the device's own "round 2: training" line, so the step count only needs to outlast the
    # 0.1 s poll below; 100 steps take about 1 s on a fast machine and 10 s on a slow one.
    slow = start_device(server.url, secret, users[2], states[2], 3, tmp_path / "cache", steps=100, seed=2)
    procs = [start_device(server.url, secret, u, s, n, tmp_path / "cache", seed=i)
             for i, (u, s, n) in enumerate(zip(users[:2], states[:2], (0, 1)))]
    log_file = states[2].parent / f"{states[2].name}.log"
    _wait_until(lambda: "round 2: training" in log_file.read_text(), 240, "the slow device to start round 2")
    first = latest_checkpoint(states[2] / "checkpoints")  # round 1's, written before its upload
    assert first is not None and first.name.startswith("ckpt-000001-")
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    assert "round 2: uploaded" not in log_file.read_text()  # killed mid-training
    assert latest_checkpoint(states[2] / "checkpoints") == first  # the kill left the checkpoint intact
    resumed = start_device(server.url, secret, users[2], states[2], 3, tmp_path / "cache", steps=100, seed=2)
    wait_all(procs + [resumed], states[:2] + [states[2]])
    check_federation(server, states, rounds=3)
    assert "resumed from" in log_file.read_text()


def test_a_fedavg_federation_averages_every_lora_module_and_refuses_other_strategies(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        users = make_users(tmp_path / "users")
        secret = init_federation(server.url, "--strategy", "fedavg")
        states = [tmp_path / f"state-{u.name}" for u in users]
        wrong = start_device(server.url, secret, users[0], tmp_path / "state-wrong", 1, tmp_path / "cache", 1, 4, 0,
                             "--strategy", "comigs-1gxs")  # without --strategy a device takes the federation's
        assert wrong.wait(timeout=120) == 2
        assert "--strategy 'comigs-1gxs' contradicts the federation's strategy 'fedavg'" in \
            (tmp_path / "state-wrong.log").read_text()
        assert status(server.url)["devices"] == 0  # refused before enrolling: it cannot block a round
        procs = [start_device(server.url, secret, u, s, 3, tmp_path / "cache", 2, 4, i, "--strategy", "fedavg")
                 for i, (u, s) in enumerate(zip(users, states))]
        wait_all(procs, states)
        last = load_file(str(server.data_dir / "blobs" / "globals" / "v000002.safetensors"))
        assert any(".experts.1." in k for k in last)  # both MLP modules are shared (FedAvg: all LoRA)
        for state in states:
            held = shared_of_checkpoint(state)
            assert all(torch.equal(held[k], last[k]) for k in last)
            ckpt = latest_checkpoint(state / "checkpoints") / "adapters"
            assert not (ckpt / "specialist.safetensors").exists()  # two modules, both generalists, despite 3
            routers = read_adapter_file(ckpt / "router.safetensors")[0]
            assert all(float(t.abs().max()) == 0 for t in routers.values())  # fixed equal gates
        done = subprocess.run([sys.executable, "-m", "device_sdk", "init-federation", "--server", server.url,
                               "--admin-token", ADMIN_TOKEN, "--model", "tiny-llama", "--strategy", "local"],
                              env=env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "runs in `python -m device_sdk simulate` only" in done.stderr
    finally:
        server.stop()


def _checkpoint_state(state: Path) -> dict:
    return json.loads((latest_checkpoint(state / "checkpoints") / "state.json").read_text())


@pytest.mark.parametrize("name", ["hetlora-full", "flexlora-full", "pcl", "ffa-lora"])
def test_per_device_rules_run_over_the_network(tmp_path, name):
    """Devices with 1, 2 and 4 experts run the strategy against a real server: HetLoRA/FlexLoRA with LoRA ranks
    8/16/32 (uploads checked against each device's rank), PCL's relayed peers mixed by each device's own trust,
    FFA-LoRA's A kept fixed at global version 0 and never uploaded."""
    server = Server(tmp_path / "agg").start()
    try:
        users = make_users(tmp_path / "users")
        secret = init_federation(server.url, "--strategy", name, "--max-experts", "4")
        states = [tmp_path / f"state-{u.name}" for u in users]
        procs = [start_device(server.url, secret, u, s, n, tmp_path / "cache", 2, 2, i, "--strategy", name,
                              "--peer-eval-tokens", "64")
                 for i, (u, s, n) in enumerate(zip(users, states, (0, 1, 3)))]
        wait_all(procs, states)
        data = server.data_dir / "blobs"
        history = [h for h in status(server.url)["history"] if h["status"] == "closed"]
        assert [h["round"] for h in history] == [1, 2] and {h["rule"] for h in history} <= {name, "mean"}
        first = load_file(str(data / "globals" / "v000000.safetensors"))
        last = load_file(str(data / "globals" / "v000002.safetensors"))
        held = [shared_of_checkpoint(s) for s in states]
        uploads = [load_file(str(p)) for p in sorted((data / "updates" / "r000002").glob("*.safetensors"))]
        key_a = next(k for k in first if k.endswith("gate_proj.experts.0.lora_A"))  # an MLP LoRA
        key_b = key_a[: -len("lora_A")] + "lora_B"
        if name in ("hetlora-full", "flexlora-full"):
            assert first[key_a].shape[0] == 32  # the largest rank the federation admits (--max-experts 4)
            assert sorted(u[key_a].shape[0] for u in uploads) == [8, 16, 32]  # device ids follow enrollment order
            assert [h[key_a].shape[0] for h in held] == [8, 16, 32]
            attention_a = [k for k in first if k.endswith("q_proj.lora.lora_A")]
            assert attention_a and all(t[k].shape[0] == 8 for t in (first, last, *uploads, *held) for k in attention_a)
            if name == "flexlora-full":  # every device holds the best rank-r_i split of the averaged update
                for h, r in zip(held, (8, 16, 32)):
                    scale = 16.0 / r ** 0.5
                    expected = last[key_b][:, :r] @ last[key_a][:r]
                    assert torch.allclose(scale * h[key_b] @ h[key_a], expected, atol=1e-5)
            else:  # HetLoRA: the first r_i components of the merged factors (zero beyond a pruned rank)
                for h, state in zip(held, states):
                    r = h[key_a].shape[0]
                    active = _checkpoint_state(state)["strategy_state"]["active_rank"]["0"]
                    assert torch.equal(h[key_a][:active], last[key_a][:active])
                    assert float(h[key_a][active:r].abs().sum()) == 0
        elif name == "pcl":
            assert {k.split("/")[0] for k in last} == {"peer0", "peer1", "peer2"}  # the server only relays
            for h, state in zip(held, states):
                trust = _checkpoint_state(state)["strategy_state"]["trust"]["0"][-1]
                assert sum(trust) == pytest.approx(1.0)
                mixed = sum(w * last[f"peer{j}/{key_b}"].double() for j, w in enumerate(trust))
                assert torch.allclose(h[key_b].double(), mixed, atol=1e-6)
        else:
            assert all(not k.endswith("lora_A") for u in uploads for k in u)  # only B travels
            assert all(not k.endswith("lora_A") for k in last)
            for h in held:
                assert all(torch.equal(h[k], first[k]) for k in first if k.endswith("lora_A"))
                assert all(torch.equal(h[k], last[k]) for k in last)
    finally:
        server.stop()


def test_a_device_above_the_federations_largest_rank_is_refused_at_enrollment(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        secret = init_federation(server.url, "--strategy", "hetlora-full", "--max-experts", "2")
        answer = httpx.post(server.url + "/enroll", json={"enroll_secret": secret, "name": "big", "capabilities": {
            "n_specialists": 0, "rank": 32, "strategy": "hetlora-full"}}, timeout=10)
        assert answer.status_code == 422 and "exceeds the federation's largest rank 16" in answer.json()["detail"]
        answer = httpx.post(server.url + "/enroll", json={"enroll_secret": secret, "name": "odd", "capabilities": {
            "n_specialists": 0, "rank": 12, "strategy": "hetlora-full"}}, timeout=10)
        assert answer.status_code == 422 and "not a multiple" in answer.json()["detail"]
        assert status(server.url)["devices"] == 0
    finally:
        server.stop()
