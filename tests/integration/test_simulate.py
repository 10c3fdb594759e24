"""The simulation runner end to end on a tiny model: what is shared, determinism, caching, the report files."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import torch

from device_sdk.data import load_users
from device_sdk.errors import ConfigError
from device_sdk.models import load_base_model
from device_sdk.parts import Role, role_state_dict
from device_sdk.sim import SimConfig, run_strategy
from device_sdk.sim.simulate import simulate

from .server import ROOT


def _cfg(data, **kw):
    settings = dict(data=data, model="tiny-llama", rounds=2, local_steps=2, batch=2, ctx=32, router_period=1,
                    router_steps=1, precision="fp32", eval_tokens=256, peer_eval_tokens=64)
    settings.update(kw)
    return SimConfig(**settings)


def _run(data, name, seed=1, **kw):
    base = load_base_model("tiny-llama")
    users = load_users(data, base.tokenizer)
    models = []
    record = run_strategy(_cfg(data, **kw), name, seed, users, base, models_out=models)
    return record, models


def test_comigs_shares_generalists_and_attention_but_keeps_specialists_and_routers_local(users_dir):
    record, models = _run(users_dir, "comigs-1gxs", experts=(3, 2, 1))
    shared = [role_state_dict(m, {Role.ATTENTION, Role.GENERALIST}) for m in models]
    for other in shared[1:]:
        assert all(torch.equal(shared[0][k], other[k]) for k in shared[0])  # one generalist for 3, 2, 1 experts
    spec = [role_state_dict(m, Role.SPECIALIST) for m in models[:2]]
    common = set(spec[0]) & set(spec[1])
    assert common and all(not torch.equal(spec[0][k], spec[1][k]) for k in common)
    assert record["iterations"] == [0, 2, 4] and len(record["test_ppl"]["u1"]) == 3
    assert record["mean"] < sum(record["pretrained"].values()) / 3  # it learned something
    assert set(record["routing"]) == {"u1", "u2"}  # u3 has one expert: no router
    assert record["host"]["isa"] == torch.backends.cpu.get_cpu_capability() and record["host"]["cpu"]


def test_local_shares_nothing_and_fedavg_ends_with_one_model(users_dir):
    _, local = _run(users_dir, "local")
    a, b = (role_state_dict(m, {Role.ATTENTION, Role.SPECIALIST}) for m in local[:2])
    assert all(not torch.equal(a[k], b[k]) for k in a)
    _, fed = _run(users_dir, "fedavg")
    a, b = (role_state_dict(m, {Role.ATTENTION, Role.GENERALIST}) for m in fed[:2])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_centralized_trains_one_model_for_everyone(users_dir):
    record, models = _run(users_dir, "centralized")
    assert len(models) == 1 and set(record["final"]) == {"u1", "u2", "u3"}


def test_same_seed_gives_identical_results_and_another_seed_does_not(users_dir):
    first, _ = _run(users_dir, "comigs-1g1s", seed=3)
    again, _ = _run(users_dir, "comigs-1g1s", seed=3)
    other, _ = _run(users_dir, "comigs-1g1s", seed=4)
    assert first["test_ppl"] == again["test_ppl"]
    assert first["test_ppl"] != other["test_ppl"]


def test_simulate_writes_the_report_and_reuses_cached_runs(users_dir, tmp_path):
    cfg = _cfg(users_dir, strategies=("local", "comigs-1g1s", "pcl"), seeds=(1, 2))
    out = tmp_path / "report"
    result = simulate(cfg, out)
    for name in ("results.json", "results.md", "curves.png", "paired.png", "experts-comigs-1g1s.png", "routing.html"):
        assert (out / name).stat().st_size > 0, name
    assert "experts-local.png" not in result["files"]  # fixed gates: nothing to show
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"local", "comigs-1g1s", "pcl"} and summary["pcl"]["seeds"] == [1, 2]
    table = (out / "results.md").read_text()
    assert "| comigs-1g1s |" in table and "pretrained" in table
    html = (out / "routing.html").read_text()
    assert "model of u1" in html and "text of u2" in html and "layer 1/2" in html and "layer 2/2" in html
    simulate(replace(cfg, routing_layers=(2,)), out)  # the same cached runs, another view
    html = (out / "routing.html").read_text()
    assert "layer 2/2" in html and "layer 1/2" not in html
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 6
    assert not list((out / "runs" / "partial").glob("*"))  # round checkpoints go once a run's record is stored
    wider = simulate(replace(cfg, seeds=(1, 2, 3)), out, cached_only=True)  # seed 3 not run: reported as missing
    assert len(wider["records"]) == 6 and ("pcl", 3) in wider["missing"]
    assert len(list((out / "runs").glob("*.json"))) == 6
    with pytest.raises(ConfigError, match="no finished run"):
        simulate(replace(cfg, rounds=3), out, cached_only=True)
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = simulate(cfg, out)
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # nothing recomputed
    assert [r["mean"] for r in again["records"]] == [r["mean"] for r in result["records"]]
    from device_sdk.sim.report import combined_markdown

    combined = combined_markdown([json.loads((out / "results.json").read_text())] * 2)
    rows = combined.splitlines()
    assert sum(row.startswith("| comigs-1g1s |") for row in rows) == 1 and combined.count("n=2") == 6
    assert rows[-1] == "| *paired against* | comigs-1g1s | comigs-1g1s |"
    runs[0].write_text("{torn")  # a torn cache file is recomputed, not trusted
    simulate(cfg, out)
    assert json.loads(runs[0].read_text())["final"]


def test_a_cached_or_partial_run_made_on_other_data_is_refused_not_reused(users_dir, tmp_path):
    cfg = _cfg(users_dir, strategies=("local",), seeds=(1,), rounds=1, local_steps=1)
    out = tmp_path / "report"
    first = simulate(cfg, out)["records"][0]
    assert len(first["data_fingerprint"]) == 16
    (users_dir / "u2" / "test.txt").write_text("red red red blue " * 20 + "\n")  # the data changed since
    with pytest.raises(ConfigError, match="made on other data than this run's.*delete .*local-seed1-"):
        simulate(cfg, out)
    with pytest.raises(ConfigError, match="made on other data"):
        simulate(cfg, out, cached_only=True)
    record = next((out / "runs").glob("local-seed1-*.json"))
    assert json.loads(record.read_text())["final"] == first["final"]  # refused, not overwritten
    record.unlink()
    partial = out / "runs" / "partial" / record.stem  # a partial run of the old data: refused as well
    partial.mkdir(parents=True)
    (partial / "data_fingerprint").write_text(first["data_fingerprint"])
    with pytest.raises(ConfigError, match="partial.*made on other data"):
        simulate(cfg, out)
    shutil.rmtree(partial)
    assert simulate(cfg, out)["records"][0]["data_fingerprint"] != first["data_fingerprint"]


def test_cli_refuses_bad_settings_clearly(users_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "device_sdk", "simulate", "--data", str(users_dir), "--out",
                               str(tmp_path / "o"), "--model", "tiny-llama", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    done = run("--experts", "4,2", "--rounds", "1")
    assert done.returncode == 2 and "--experts has 2 values for 3 users" in done.stderr
    done = run("--strategies", "local,fedprox")
    assert done.returncode == 2 and "unknown strategies ['fedprox']" in done.stderr


@pytest.mark.parametrize("name", ["comigs-1gxs", "hetlora-full", "pcl"])
def test_a_killed_run_resumes_after_its_last_round_with_identical_numbers(users_dir, tmp_path, monkeypatch, name):
    import device_sdk.round as device_round  # where every device's round trains (the simulation's too)

    base = load_base_model("tiny-llama")
    users = load_users(users_dir, base.tokenizer)
    cfg = _cfg(users_dir, rounds=3, experts=(3, 2, 1))
    whole_models, resumed_models = [], []
    whole = run_strategy(cfg, name, 3, users, base, models_out=whole_models)
    real, calls = device_round.train_local, []

    def killed_in_round_3(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * len(users):
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(device_round, "train_local", killed_in_round_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_strategy(cfg, name, 3, users, base, resume_dir=tmp_path / "partial")
    assert json.loads((tmp_path / "partial" / "progress.json").read_text())["round"] == 2
    monkeypatch.setattr(device_round, "train_local", real)
    resumed = run_strategy(cfg, name, 3, users, base, models_out=resumed_models, resume_dir=tmp_path / "partial")
    for key in ("iterations", "test_ppl", "expert_scores", "train_loss", "strategy_state", "routing"):
        assert resumed[key] == whole[key], key
    for a, b in zip(whole_models, resumed_models):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["comigs-1gxs", "ffa-lora", "hetlora-full", "flexlora-full", "pcl"])
def test_via_server_gives_identical_results_to_in_process(users_dir, name):
    """The server runs each strategy's own rule (mean, FFA's B-only mean, HetLoRA/FlexLoRA across ranks 24/16/8,
    PCL's relay scored on each device), so results are bit-identical to the in-process run."""
    from device_sdk.sim.via_server import LoopbackAggregator

    base = load_base_model("tiny-llama")
    users = load_users(users_dir, base.tokenizer)
    cfg = _cfg(users_dir, experts=(3, 2, 1))
    local_models, server_models = [], []
    in_process = run_strategy(cfg, name, 5, users, base, models_out=local_models)
    with LoopbackAggregator() as server:
        through = run_strategy(cfg, name, 5, users, base, models_out=server_models, server=server)
        status = httpx.get(server.url + "/status", timeout=10).json()
    assert through["via_server"] and not in_process["via_server"]
    assert [h["round"] for h in status["history"] if h.get("participants")] == [1, 2]
    assert through["test_ppl"] == in_process["test_ppl"]
    assert through["strategy_state"] == in_process["strategy_state"]
    for a, b in zip(local_models, server_models):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if name.startswith(("hetlora", "flexlora")):
        ranks = [m.get_parameter("model.layers.0.mlp.mlp.gate_proj.experts.0.lora_A").shape[0] for m in local_models]
        assert ranks == [24, 16, 8]  # the MLP LoRA's rank follows the device; the attention LoRA stays at 8
        assert all(m.get_parameter("model.layers.0.self_attn.q_proj.lora.lora_A").shape[0] == 8 for m in local_models)


def test_via_server_refuses_strategies_that_share_nothing(users_dir):
    from device_sdk.errors import ConfigError
    from device_sdk.sim.via_server import LoopbackAggregator, ServerRounds
    from device_sdk.strategies import make_strategy

    with LoopbackAggregator() as server, pytest.raises(ConfigError, match="local shares nothing through a server"):
        ServerRounds(server, make_strategy("local"), "tiny-llama", 8, 16.0, {}, [])


def test_demo_preset_prints_the_table_and_the_report_path(users_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "device_sdk", "simulate", "--preset", "demo", "--data", str(users_dir),
                           "--out", str(tmp_path / "cmp"), "--model", "tiny-llama", "--precision", "fp32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| comigs-1g1s |" in done.stdout and "| fedavg |" in done.stdout and "| local |" in done.stdout
    assert f"routing.html: {tmp_path / 'cmp' / 'routing.html'}" in done.stdout


def test_out_of_distribution_targets_the_mixture_and_routes_own_topic_texts(users_dir, tmp_path):
    cfg = _cfg(users_dir, strategies=("comigs-1g1s",), rounds=1, ood=True)
    record = simulate(cfg, tmp_path / "ood")["records"][0]
    assert len(set(record["pretrained"].values())) == 1  # one shared test mixture for every user
    samples = record["routing"]["u1"]
    texts = {s["text_of"]: "".join(s["tokens"]) for s in samples}
    assert set(texts) == {"u1", "u2", "u3"} and len(set(texts.values())) == 3  # each user's own topic
    assert any(word in texts["u1"] for word in ("alpha", "beta", "gamma", "delta"))


def test_low_data_users_train_on_their_first_tokens_only(users_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "device_sdk", "simulate", "--data", str(users_dir), "--out",
                               str(tmp_path / "o"), "--model", "tiny-llama", "--precision", "fp32",
                               "--strategies", "local", "--rounds", "1", "--local-steps", "2", "--batch", "2",
                               "--ctx", "32", "--eval-tokens", "128", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    done = run("--train-tokens", "u1=40")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "o" / "results.json").read_text())["settings"]
    assert settings["train_tokens"] == [["u1", 40]]
    assert run().returncode == 0  # the same settings on full data: another cached run, not the capped one
    assert len(list((tmp_path / "o" / "runs").glob("local-seed1-*.json"))) == 2
    done = run("--train-tokens", "zz=100")
    assert done.returncode == 2 and "['zz']" in done.stderr and "['u1', 'u2', 'u3']" in done.stderr
    done = run("--train-tokens", "u1=many")
    assert done.returncode == 2 and "USER=TOKENS" in done.stderr
