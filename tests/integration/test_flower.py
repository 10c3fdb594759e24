"""Our ServerApp and ClientApp on Flower 1.42: every strategy's rule through Flower messages, Flower's simulation
engine (Ray, real worker processes) and a SuperLink deployment on loopback, each against the in-process simulation
on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the [flower] extra is not installed")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from device_sdk.data import load_users  # noqa: E402
from device_sdk.flower.client_app import DEVICES as client_devices  # noqa: E402
from device_sdk.flower.client_app import app as client_app  # noqa: E402
from device_sdk.flower.launch import EXAMPLE_APP, OFFLINE_ENV, LoopbackDeployment  # noqa: E402
from device_sdk.flower.server_app import serve  # noqa: E402
from device_sdk.flower.server_app import FlowerRunError  # noqa: E402
from device_sdk.flower.wire import ARRAYS, CONFIG, METRICS, FlowerRun, from_record, to_record  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
from device_sdk.parts import SHARED_ROLES, iter_role_parameters  # noqa: E402
from device_sdk.sim import SimConfig, run_strategy  # noqa: E402
from device_sdk.strategies import make_strategy  # noqa: E402

from .._tiny import tiny_model_for  # noqa: E402
from .server import ROOT  # noqa: E402

os.environ.update(OFFLINE_ENV)
#: What must agree between a Flower run and the in-process run of the same settings and seed.
SAME = ("users", "experts", "iterations", "test_ppl", "pretrained", "final", "mean", "train_loss", "expert_scores",
        "routing", "strategy_state", "trainable_params")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and spin-waiting OpenMP threads crawl on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(data, **kw) -> SimConfig:
    settings = dict(data=data, model="tiny-llama", rounds=2, local_steps=2, batch=2, ctx=32, router_period=1,
                    router_steps=1, precision="fp32", eval_tokens=256, peer_eval_tokens=64)
    settings.update(kw)
    return SimConfig(**settings)


class InlineGrid(Grid):
    """A Grid that hands every message to our ClientApp in this process (one Context per virtual node) and keeps
    every message both ways, so that a test sees exactly what would travel."""

    def __init__(self, nodes: int, fails=None, tamper=None, after=None) -> None:
        """``fails(message, user)``: True to answer that message with an error instead (a device that failed);
        ``tamper(message, user, reply)``: the reply content that travels instead (a broken or hostile device);
        ``after(grid, messages)``: called after each exchange (e.g. to restart a node)."""
        from flwr.supercore.task_identity import TaskIdentity

        self.fails = fails or (lambda message, user: False)
        self.tamper = tamper
        self.after = after

        # who sends: what Flower's runtimes set before a ServerApp runs (run 7, the SuperLink's node id 0)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
        self.contexts = {100 + i: Context(run_id=7, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(nodes)}
        self.carried: list[Message] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            context = self.contexts.get(message.metadata.dst_node_id)
            if context is None:  # a node that is gone: the message times out
                reply = message.create_error_reply(Error(code=2, reason="node gone"))
            elif self.fails(message, context.node_config["partition-id"]):
                reply = message.create_error_reply(Error(code=1, reason="injected failure"))
            else:
                reply = client_app(message, context)
                if self.tamper is not None:
                    content = self.tamper(message, context.node_config["partition-id"], reply)
                    if content is not reply.content:
                        reply = Message(content, reply_to=message)
            self.carried += [message, reply]
            replies.append(reply)
        if self.after is not None:
            self.after(self, messages)
        return replies

    def restart(self, node: int, new_node: int) -> None:
        """The SuperNode ``node`` restarts: its device comes back as ``new_node``, with a fresh process (nothing in
        memory) and its state folder."""
        old = self.contexts.pop(node)
        self.contexts[new_node] = Context(run_id=7, node_id=new_node, node_config=old.node_config,
                                          state=RecordDict(), run_config={})
        client_devices.devices.clear()


def _role_names(strategy: str, experts: int) -> tuple[set[str], set[str]]:
    """(names of shared-role tensors, names of specialist and router tensors) of a device's model."""
    model = tiny_model_for(make_strategy(strategy), n_experts=experts)
    shared, private = set(), set()
    for name, _, role in iter_role_parameters(model):
        (shared if role in SHARED_ROLES else private).add(name)
    return shared, private


@pytest.mark.parametrize("name", ["comigs-1gxs", "ffa-lora", "hetlora-full", "flexlora-active", "pcl"])
def test_flower_messages_give_the_in_process_numbers_and_carry_shared_roles_only(users_dir, tmp_path, name):
    """The ServerApp strategy runs each strategy's own rule (the mean, FFA's B-only mean, HetLoRA/FlexLoRA across
    ranks 24/16/8, PCL's relay scored on each device), the ClientApp the simulation's device code: bit-identical
    records; and no message ever holds a specialist or a router."""
    cfg = _cfg(users_dir, experts=(3, 2, 1))
    base = load_base_model("tiny-llama")
    users = load_users(users_dir, base.tokenizer)
    in_process = run_strategy(cfg, name, 5, users, base)
    grid = InlineGrid(len(users))
    run = FlowerRun(sim=cfg, strategy=name, seed=5, devices=len(users), state_root=str(tmp_path / "state"),
                    routing_report=True)
    record = serve(grid, run)
    for key in SAME:
        assert record[key] == in_process[key], key
    shared, private = set(), set()
    for experts in (3, 2, 1):
        s, p = _role_names(name, experts)
        shared, private = shared | s, private | p
    carried = {key.partition("/")[2] if key.startswith("peer") else key
               for m in grid.carried if m.has_content() and ARRAYS in m.content for key in m.content[ARRAYS]}
    assert carried and carried <= shared and not carried & private
    if name == "comigs-1gxs":
        assert any(".experts.1." in n for n in private)  # the 3-expert device has specialists; none travelled
    traffic = record["flower"]["traffic"]
    assert [t["round"] for t in traffic] == [0, 1, 2]
    assert all(t["up"][str(u)] > 0 for t in traffic[1:] for u in range(3))
    # a device that evaluated version r trains round r + 1 without downloading it again
    trains = [m for m in grid.carried if m.metadata.message_type == "train"]
    assert len(trains) == 2 * 2 * 3 and not any(ARRAYS in m.content for m in trains if m.metadata.dst_node_id)


def _to_devices(grid: InlineGrid, message_type: str) -> list[Message]:
    return [m for m in grid.carried if m.metadata.message_type == message_type and m.metadata.dst_node_id]


def test_round_policy_trains_a_fraction_and_publishes_only_with_a_quorum(users_dir, tmp_path):
    cfg = _cfg(users_dir)
    # a third of three devices, at least one: one device trains per round (drawn with the seed), all evaluate
    grid = InlineGrid(3)
    record = serve(grid, FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3, min_devices=1, fraction=0.34,
                                   state_root=str(tmp_path / "a")))
    assert len(_to_devices(grid, "train")) == 2
    assert all(len(curve) == 3 for curve in record["test_ppl"].values())
    # without routing_report no device's test text leaves it
    assert record["routing"] == {} and record["strategy_state"] is not None
    assert not any("routing" in str(m.content[CONFIG].get("reports", "")) for m in grid.carried
                   if m.has_content() and CONFIG in m.content and not m.metadata.dst_node_id)
    assert sum(len(losses) for losses in record["train_loss"].values()) == 2
    # device 2 fails to train: two uploads, fewer than min_devices=3, so no new global is published
    grid = InlineGrid(3, fails=lambda message, user: message.metadata.message_type == "train" and user == 2)
    record = serve(grid, FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3, state_root=str(tmp_path / "b")))
    evaluations = _to_devices(grid, "evaluate")
    # version 0 each time: after a round that published nothing every device that trained gets it back whole
    assert len(evaluations) == 9 and sum(ARRAYS in m.content for m in evaluations) == 9
    assert all(m.content[CONFIG]["version"] == 0 for m in evaluations)
    assert record["flower"]["rounds"] == [{"round": 1, "published": False}, {"round": 2, "published": False}]
    # FedAvg's model is all shared: back on version 0, every device measures what it measured before training
    assert all(curve == [curve[0]] * 3 for curve in record["test_ppl"].values())
    assert record["train_loss"]["u3"] == [] and len(record["train_loss"]["u1"]) == 2
    grid = InlineGrid(3, fails=lambda message, user: message.metadata.message_type == "train" and user == 2)
    record = serve(grid, FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3, min_devices=2,
                                   state_root=str(tmp_path / "c")))
    assert sum(ARRAYS in m.content for m in _to_devices(grid, "evaluate")) == 9  # versions 0, 1, 2


def test_a_broken_or_hostile_device_is_dropped_and_the_run_goes_on(users_dir, tmp_path):
    """What the aggregator refuses, the ServerApp drops: tensors beyond max_abs_value, a reply without its metrics;
    an evaluation that names another user is taken as its own node's; the run ends with a finite global."""
    cfg = _cfg(users_dir)
    clean = serve(InlineGrid(3), FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3, min_devices=2,
                                           state_root=str(tmp_path / "clean")))

    def impostor(message, user, reply):  # device 2 says it is user 0 in every evaluation
        if message.metadata.message_type == "evaluate" and user == 2:
            content = reply.content
            content[METRICS]["user"] = 0
            return content
        return reply.content

    record = serve(InlineGrid(3, tamper=impostor), FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3,
                                                             min_devices=2, state_root=str(tmp_path / "imp")))
    assert record["test_ppl"] == clean["test_ppl"]

    def hostile():
        """In its first round device 1 sends huge values and device 2 a reply without its metrics."""
        done: set[int] = set()

        def tamper(message, user, reply):
            if message.metadata.message_type != "train" or user in done:
                return reply.content
            done.add(user)
            if user == 1:
                huge = {name: t * 1e20 for name, t in from_record(reply.content[ARRAYS]).items()}
                return RecordDict({ARRAYS: to_record(huge), METRICS: reply.content[METRICS]})
            if user == 2:
                return RecordDict({ARRAYS: reply.content[ARRAYS]})
            return reply.content
        return tamper

    record = serve(InlineGrid(3, tamper=hostile()), FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3,
                                                              min_devices=2, state_root=str(tmp_path / "two")))
    # round 1 keeps one valid upload of min_devices=2: nothing published, and the run goes on to round 2
    assert [r["published"] for r in record["flower"]["rounds"]] == [False, True]
    record = serve(InlineGrid(3, tamper=hostile()), FlowerRun(sim=cfg, strategy="fedavg", seed=2, devices=3,
                                                              min_devices=1, state_root=str(tmp_path / "one")))
    assert [r["published"] for r in record["flower"]["rounds"]] == [True, True]
    assert [len(record["train_loss"][u]) for u in ("u1", "u2", "u3")] == [2, 1, 1]
    assert all(v is not None and v == v and v < 1e6 for curve in record["test_ppl"].values() for v in curve)


def test_a_device_whose_supernode_restarts_is_taken_back_on_its_new_node(users_dir, tmp_path):
    """Node 101 restarts after round 1 as node 201 (a new process, its state folder kept): the server asks the new
    node who it is and takes the device back; the run's numbers are those of a run without the restart."""
    cfg = _cfg(users_dir, experts=(3, 2, 1), rounds=3)
    clean = serve(InlineGrid(3), FlowerRun(sim=cfg, strategy="comigs-1gxs", seed=4, devices=3,
                                           state_root=str(tmp_path / "clean")))

    def restart_after_round_1(grid, messages):
        if any(m.metadata.message_type == "evaluate" and m.content[CONFIG]["version"] == 1 for m in messages):
            grid.restart(101, 201)

    grid = InlineGrid(3, after=restart_after_round_1)
    record = serve(grid, FlowerRun(sim=cfg, strategy="comigs-1gxs", seed=4, devices=3,
                                   state_root=str(tmp_path / "restart")))
    for key in SAME:
        assert record[key] == clean[key], key
    to_201 = [m for m in grid.carried if m.metadata.dst_node_id == 201]
    assert [m.metadata.message_type for m in to_201] == ["query.hello", "train", "evaluate", "train", "evaluate"]
    assert ARRAYS in to_201[1].content  # a restarted device gets the global whole


def test_a_node_that_joins_mid_run_as_no_device_of_it_is_asked_once(users_dir, tmp_path):
    def a_stranger_joins(grid, messages):
        if 300 not in grid.contexts and any(m.metadata.message_type == "evaluate" for m in messages):
            grid.contexts[300] = Context(run_id=7, node_id=300, node_config={"partition-id": 9}, state=RecordDict(),
                                         run_config={})

    grid = InlineGrid(3, fails=lambda message, user: user == 9, after=a_stranger_joins)  # it has no state here
    record = serve(grid, FlowerRun(sim=_cfg(users_dir, rounds=3), strategy="fedavg", seed=1, devices=3,
                                   state_root=str(tmp_path / "s")))
    assert [m.metadata.message_type for m in grid.carried if m.metadata.dst_node_id == 300] == ["query.hello"]
    assert [r["published"] for r in record["flower"]["rounds"]] == [True, True, True]


def test_devices_that_disagree_at_the_start_stop_the_run_naming_the_device(users_dir, tmp_path):
    def extra_tensor(message, user, reply):
        if message.metadata.message_type.endswith("init") and user == 1:
            tensors = from_record(reply.content[ARRAYS])
            tensors["model.layers.0.extra"] = torch.zeros(2)
            return RecordDict({**dict(reply.content.items()), ARRAYS: to_record(tensors)})
        return reply.content

    with pytest.raises(FlowerRunError, match="device 1 shares other tensors than device 0.*model.layers.0.extra"):
        serve(InlineGrid(3, tamper=extra_tensor), FlowerRun(sim=_cfg(users_dir), strategy="fedavg", seed=2,
                                                            devices=3, state_root=str(tmp_path / "s")))


def test_run_config_of_the_example_app_builds_a_run():
    import tomllib

    config = tomllib.loads((EXAMPLE_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    run = FlowerRun.from_run_config(config["config"])
    assert run.strategy == "comigs-1gxs" and run.quorum == run.devices and run.sim.eval_tokens == 4096
    assert config["components"]["clientapp"] == "device_sdk.flower.client_app:app"
    with pytest.raises(Exception, match="unknown run config keys"):
        FlowerRun.from_run_config({**config["config"], "learning-rate": 1})


def test_simulate_on_flowers_engine_gives_the_local_engines_numbers(users_dir, tmp_path):
    """`simulate --engine flower`: two virtual devices as Ray workers (real processes, one thread each), the same
    record as the local engine (``run_strategy``, what `--engine local` runs) for the same seed, bit for bit."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "flower"
    done = subprocess.run([sys.executable, "-m", "device_sdk", "simulate", "--data", str(users_dir), "--out",
                           str(out), "--model", "tiny-llama", "--users", "u1,u2", "--strategies", "comigs-1gxs",
                           "--experts", "3,2", "--rounds", "2", "--local-steps", "2", "--batch", "2", "--ctx", "32",
                           "--router-period", "1", "--router-steps", "1", "--precision", "fp32", "--eval-tokens",
                           "256", "--peer-eval-tokens", "64", "--engine", "flower", "--flower-cpus", "2"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (flower,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert flower["engine"] == "flower" and "| comigs-1gxs |" in done.stdout
    base = load_base_model("tiny-llama")
    users = load_users(users_dir, base.tokenizer, ["u1", "u2"])
    local = run_strategy(_cfg(users_dir, users=("u1", "u2"), experts=(3, 2)), "comigs-1gxs", 1, users, base)
    for key in SAME:
        assert flower[key] == local[key], key


def test_a_superlink_deployment_runs_the_app_and_matches_in_process(users_dir, tmp_path):
    """A SuperLink and one SuperNode per device on 127.0.0.1 (real processes), the app started with `flwr run`:
    the record equals the in-process simulation's; every process is gone afterwards."""
    experts = {"u1": 3, "u2": 2}
    nodes = [{"data": str(users_dir / name), "user": i, "experts": n, "state": str(tmp_path / "state" / name)}
             for i, (name, n) in enumerate(experts.items())]
    settings = {"strategy": "hetlora-full", "devices": 2, "seed": 3, "model": "tiny-llama", "rounds": 1,
                "local-steps": 2, "batch": 2, "ctx": 32, "router-period": 1, "router-steps": 1, "precision": "fp32",
                "device": "cpu", "eval-tokens": 256, "peer-eval-tokens": 64, "timeout-s": 300.0,
                "routing-report": True}
    with LoopbackDeployment(nodes, tmp_path / "flower") as deployment:
        record = deployment.run(EXAMPLE_APP, settings, timeout_s=420)
        procs = list(deployment.procs)
    assert all(p.poll() is not None for p in procs)
    base = load_base_model("tiny-llama")
    users = load_users(users_dir, base.tokenizer, ["u1", "u2"])
    cfg = _cfg(users_dir, users=("u1", "u2"), experts=(3, 2), rounds=1)
    in_process = run_strategy(cfg, "hetlora-full", 3, users, base)
    for key in SAME:
        assert record[key] == in_process[key], key
    down = record["flower"]["traffic"][1]["down"]
    assert set(down) == {"0", "1"} and all(v > 0 for v in down.values())
    shared, private = _role_names("hetlora-full", 3)
    uploaded = set(record["flower"]["uploaded_names"])
    assert uploaded and uploaded <= shared and not uploaded & private
