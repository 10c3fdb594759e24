"""A federation in which one device trains through the ExecuTorch training program and the others with PyTorch:
real aggregator, real device processes, tiny Llama models."""

from __future__ import annotations

import json

import pytest

from device_sdk.backends.executorch import META, PROGRAM, TRAINABLE_DATA

from .server import Server
from .test_federation import check_federation, init_federation, make_users, start_device, wait_all

pytest.importorskip("executorch")

ROUNDS = 2


def test_one_executorch_device_and_two_pytorch_devices_complete_rounds(tmp_path):
    server = Server(tmp_path / "agg").start()
    try:
        users = make_users(tmp_path / "users")
        secret = init_federation(server.url)
        states = [tmp_path / f"state-{u.name}" for u in users]
        backends = ("pytorch", "executorch", "pytorch")  # the middle device: 1 specialist, a router, a program
        procs = [start_device(server.url, secret, u, s, n, tmp_path / "cache", ROUNDS, 4, i, "--backend", b)
                 for i, (u, s, n, b) in enumerate(zip(users, states, (0, 1, 3), backends))]
        wait_all(procs, states, timeout=900)  # the ExecuTorch device exports its program first (a minute or two)
        check_federation(server, states, ROUNDS)
        program = states[1] / "train-program"
        assert (program / PROGRAM).is_file() and (program / TRAINABLE_DATA).is_file()
        meta = json.loads((program / META).read_text())
        assert (meta["batch_size"], meta["context"]) == (4, 32)
        assert any(role == "router" for role in (p["role"] for p in meta["parameters"].values()))
        for pytorch_state in (states[0], states[2]):
            assert not (pytorch_state / "train-program").exists()
    finally:
        server.stop()


def _device_checkpoint(folder):
    """Adapters of a fresh tiny-Llama device of the default strategy (1 specialist), as ``join`` builds it."""
    from dataclasses import replace

    import torch

    from device_sdk.adapters import save_adapters
    from device_sdk.inject import inject_adapters
    from device_sdk.models import load_base_model
    from device_sdk.strategies import DEFAULT_NETWORKED, networked_strategy

    strategy = networked_strategy(DEFAULT_NETWORKED)
    strategy.rank = 8
    torch.manual_seed(0)
    model = inject_adapters(load_base_model("tiny-llama", seed=0).model,
                            replace(strategy.adapter_config(0, 2), alpha=16.0))
    strategy.prepare(0, model)
    save_adapters(model, folder / "adapters", "tiny-llama")
    return folder


def test_the_edge_app_trains_through_its_programs_next_to_a_pytorch_device(tmp_path):
    import subprocess
    import sys

    from .server import ROOT
    from .test_federation import env, status

    checkpoint = _device_checkpoint(tmp_path / "ckpt")
    phone = tmp_path / "phone"
    for fmt, extra in (("pte-train", ["--batch-size", "2", "--context", "32"]), ("pte", ["--max-seq", "64"])):
        done = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--format", fmt,
                               "--out", str(phone / fmt), *extra], env=env(), capture_output=True, text=True,
                              timeout=1200, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
    server = Server(tmp_path / "agg").start()
    try:
        users = make_users(tmp_path / "users", names=("de", "fr"))
        secret = init_federation(server.url, "--min-devices", "2")
        pytorch = start_device(server.url, secret, users[0], tmp_path / "state-de", 1, tmp_path / "cache", ROUNDS, 4)
        app = subprocess.run([sys.executable, "examples/edge_app.py", "--server", server.url, "--enroll-secret",
                              secret, "--train-program", str(phone / "pte-train"), "--inference-program",
                              str(phone / "pte"), "--data", str(users[1]), "--state", str(tmp_path / "state-app"),
                              "--rounds", str(ROUNDS), "--local-steps", "4", "--router-period", "2",
                              "--router-steps", "1"], env=env(), capture_output=True, text=True, timeout=900,
                             cwd=ROOT)
        assert app.returncode == 0, app.stderr[-3000:]
        wait_all([pytorch], [tmp_path / "state-de"], timeout=600)
        assert f"round {ROUNDS}:" in app.stdout and "synced to global version" in app.stdout
        closed = [h for h in status(server.url)["history"] if h["status"] == "closed"]
        assert [h["round"] for h in closed] == list(range(1, ROUNDS + 1))
        assert all(len(h["participants"]) == 2 for h in closed)
    finally:
        server.stop()
