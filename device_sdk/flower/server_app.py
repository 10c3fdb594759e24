"""The Flower ``ServerApp``: our round policy and our server rules on Flower's Message API.

:class:`CoMiGSStrategy` is a Flower strategy (``flwr.serverapp.strategy.Strategy``) whose aggregation is the
strategy's own server rule from :mod:`device_sdk.federated` (``RULES[spec.rule]``, the function the aggregator runs):
the mean (FedAvg, CoMiGS's generalists and attention LoRA, FFA-LoRA's B matrices), HetLoRA's padded
sparsity-weighted mean and FlexLoRA's SVD of the mean update over per-device ranks, PCL's relay of every upload.
Uploads are checked with the same :func:`device_sdk.federated.validate` (names, shapes at the device's rank, dtypes,
finite values). Each device then applies the strategy's receive step itself.

A run (:func:`serve`):

1. waits until ``devices`` nodes are connected and asks each for its initial shared tensors (``query`` ``init``);
   version 0 of the global is, per name, the largest of them (each device cuts it to its own shape), and the
   devices evaluate it (round 0 of the learning curves);
2. runs ``rounds`` rounds of Flower's strategy loop: ``train`` messages to the devices drawn for the round (a
   ``fraction`` of them, at least ``min_devices``), the server rule over the replies (published only if at least
   ``min_devices`` devices reported valid tensors), ``evaluate`` messages with the new global to every device.

A device that already holds the global version a message refers to gets the message without arrays. The run's
record has the simulation's format (learning curves, router scores, routing report, strategy state) plus the bytes
each device sent and received per round.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from ..errors import ConfigError, SDKError
from ..federated import RULES, InvalidUpload, TensorSpec, Upload, largest, networked_spec, spec_of, validate
from ..fileio import atomic_write_bytes
from .wire import ARRAYS, CONFIG, INIT_QUERY, METRICS, NUM_EXAMPLES, FlowerRun, from_record, to_record

log = logging.getLogger(__name__)


class FlowerRunError(SDKError):
    """A Flower run could not go on (devices missing, every reply failed)."""


class CoMiGSStrategy(FlowerStrategy):
    """Flower strategy running one of our collaboration strategies' server rule with our round policy.

    Args:
        run: the run's settings (sent to every device with each message).
        threads: torch threads each device uses (0: the device's default).
    """

    def __init__(self, run: FlowerRun, threads: int = 0) -> None:
        self.run = run
        self.threads = threads
        self.spec = networked_spec(run.strategy)  # the server side: which tensors travel, at which shapes
        self.rule = RULES[self.spec.rule]  # the function the aggregator runs
        self.run_json = run.to_json()
        self.users: dict[int, int] = {}  # node id -> user index
        self.facts: dict[int, dict] = {}  # user -> rank, alpha, experts, trainable params, name
        self.global_spec: dict[str, TensorSpec] = {}  # names, shapes (the largest) and dtypes of the global
        self.version = 0  # the current global version
        self.holds: dict[int, int] = {}  # node id -> global version it has loaded
        self.curves: dict[int, dict] = {}  # user -> test ppl, scores, train loss
        self.iterations: list[int] = []
        self.final: dict[int, dict] = {}  # user -> routing, strategy state (last round)
        self.traffic: list[dict] = []  # per round: bytes down / up per user
        self.uploaded_names: set[str] = set()

    # --- start: devices and version 0 -------------------------------------------------------------------------------
    def initialise(self, grid: Grid) -> ArrayRecord:
        """Wait for the devices, collect their initial shared tensors, evaluate version 0; returns version 0.

        Raises:
            FlowerRunError: if the devices do not all connect and answer within ``timeout_s``.
        """
        nodes = wait_for_nodes(grid, self.run.devices, self.run.timeout_s)
        self._round_traffic(0)
        messages = [self._message(node, f"{MessageType.QUERY}.{INIT_QUERY}", None, 0) for node in nodes]
        uploads = []
        for reply in self._replies(grid.send_and_receive(messages, timeout=self.run.timeout_s), "init"):
            metrics = reply.content[METRICS]
            user = int(metrics["user"])
            if user in self.facts:
                raise FlowerRunError(f"two devices say they are user {user}; give each SuperNode its own "
                                     "--node-config user=INDEX")
            self.users[reply.metadata.src_node_id] = user
            self.facts[user] = {"rank": int(metrics["rank"]), "alpha": float(metrics["alpha"]),
                                "experts": int(metrics["experts"]), "trainable": int(metrics["trainable-params"]),
                                "name": str(reply.content[CONFIG]["name"])}
            tensors = from_record(reply.content[ARRAYS])
            self._count(0, user, up=reply.content[ARRAYS].count_bytes())
            uploads.append(Upload(user, tensors, 0, self.facts[user]["rank"], self.facts[user]["alpha"]))
        if len(uploads) < self.run.devices:
            raise FlowerRunError(f"only {len(uploads)} of {self.run.devices} devices answered the init query; see "
                                 "the devices' logs")
        uploads.sort(key=lambda u: u.user)
        names = sorted({name for u in uploads for name in u.tensors})
        initial = {name: largest(uploads, name) for name in names}  # each device cuts it to its own shape
        self.global_spec = spec_of(initial)
        arrays = to_record(initial)
        self._evaluate_round(0, grid, arrays)
        return arrays

    def _evaluate_round(self, server_round: int, grid: Grid, arrays: ArrayRecord) -> None:
        replies = grid.send_and_receive(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                        timeout=self.run.timeout_s)
        self.aggregate_evaluate(server_round, replies)

    # --- messages ---------------------------------------------------------------------------------------------------
    def _message(self, node: int, message_type: str, arrays: ArrayRecord | None, server_round: int,
                 final: bool = False) -> Message:
        """A message to ``node`` with the run's settings and the current global version; the arrays only if the
        device does not hold that version yet."""
        config = ConfigRecord({"run": self.run_json, "version": self.version, "threads": self.threads,
                               "final": final})
        content = RecordDict({CONFIG: config})
        if arrays is not None and self.holds.get(node) != self.version:
            content[ARRAYS] = arrays
            self._count(server_round, self.users.get(node, -1), down=arrays.count_bytes())
        return Message(content, dst_node_id=node, message_type=message_type)

    def _replies(self, replies: Iterable[Message], phase: str) -> list[Message]:
        good = []
        for reply in replies:
            if reply.has_error():
                log.warning("%s: device on node %d failed: %s", phase, reply.metadata.src_node_id,
                            reply.error.reason)
            else:
                good.append(reply)
        return good

    def _sample(self, server_round: int) -> list[int]:
        """The nodes that train in ``server_round``: ``fraction`` of them (at least the quorum), drawn with the run's
        seed by user index, so that a rerun draws the same devices."""
        by_user = sorted(self.users.items(), key=lambda item: item[1])
        count = min(len(by_user), max(self.run.quorum, int(len(by_user) * self.run.fraction)))
        if count == len(by_user):
            return [node for node, _ in by_user]
        chosen = random.Random(self.run.seed * 100_003 + server_round).sample(by_user, count)
        return [node for node, _ in sorted(chosen, key=lambda item: item[1])]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_traffic(server_round)
        return [self._message(node, MessageType.TRAIN, arrays, server_round) for node in self._sample(server_round)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        final = server_round == self.run.sim.rounds
        return [self._message(node, MessageType.EVALUATE, arrays, server_round, final) for node in self.users]

    # --- aggregation ------------------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's server rule over the valid uploads, in user order (``None`` below the quorum)."""
        uploads, losses = [], {}
        for reply in self._replies(replies, f"round {server_round} train"):
            node, metrics = reply.metadata.src_node_id, reply.content[METRICS]
            user = self.users[node]
            record = reply.content[ARRAYS]
            self._count(server_round, user, up=record.count_bytes())
            tensors = from_record(record)
            try:
                validate(tensors, self.upload_spec(user))
            except InvalidUpload as err:
                log.warning("round %d: dropped the upload of device %d: %s", server_round, user, err.message)
                continue
            self.uploaded_names.update(tensors)
            self.holds[node] = self.version  # it synced to the version it trained on
            uploads.append(Upload(user, tensors, int(metrics[NUM_EXAMPLES]), int(metrics["rank"]),
                                  float(metrics["alpha"])))
            losses[user] = float(metrics["train-loss"])
        for user, loss in losses.items():
            self.curves.setdefault(user, {}).setdefault("train_loss", []).append(loss)
        if len(uploads) < self.run.quorum:
            log.warning("round %d: %d valid upload(s), fewer than min_devices=%d; the global stays at version %d",
                        server_round, len(uploads), self.run.quorum, self.version)
            return None, None
        uploads.sort(key=lambda u: u.user)
        merged = self.rule(uploads)
        self.version = server_round
        tokens = sum(u.tokens for u in uploads)
        metrics = MetricRecord({"devices": len(uploads), NUM_EXAMPLES: tokens,
                                "train-loss": sum(losses.values()) / len(losses)})
        return to_record(merged), metrics

    def upload_spec(self, user: int) -> dict[str, TensorSpec]:
        """What device ``user`` must upload: the strategy's travelling tensors at the device's shapes (its rank)."""
        shapes = self.spec.upload_shapes({name: s.shape for name, s in self.global_spec.items()},
                                         self.facts[user]["rank"])
        return {name: TensorSpec(tuple(shape), self.global_spec[name].dtype) for name, shape in shapes.items()}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every device's test perplexity, router scores (and, last, its routing report and state)."""
        steps, ppl = [], []
        for reply in self._replies(replies, f"round {server_round} evaluate"):
            metrics = reply.content[METRICS]
            user = int(metrics["user"])
            self.holds[reply.metadata.src_node_id] = self.version
            reports = json.loads(str(reply.content[CONFIG]["reports"]))
            curve = self.curves.setdefault(user, {})
            curve.setdefault("test_ppl", []).append(float(metrics["test-ppl"]))
            step = int(metrics["step"])
            curve.setdefault("scores", []).append({"iteration": step, "layers": reports["scores"]})
            if "routing" in reports:
                self.final[user] = reports
            steps.append(step)
            ppl.append(float(metrics["test-ppl"]))
        if not ppl:
            return None
        self.iterations.append(min(steps))
        return MetricRecord({"test-ppl": sum(ppl) / len(ppl), "devices": len(ppl)})

    def summary(self) -> None:
        log.info("CoMiGS strategy %s: %d devices, fraction %.2f, min_devices %d, %d rounds", self.run.strategy,
                 self.run.devices, self.run.fraction, self.run.quorum, self.run.sim.rounds)

    # --- bookkeeping ------------------------------------------------------------------------------------------------
    def _round_traffic(self, server_round: int) -> None:
        self.traffic.append({"round": server_round, "down": {}, "up": {}})

    def _count(self, server_round: int, user: int, down: int = 0, up: int = 0) -> None:
        entry = next((t for t in self.traffic if t["round"] == server_round), None)
        if entry is None:
            entry = {"round": server_round, "down": {}, "up": {}}
            self.traffic.append(entry)
        key = str(user)
        entry["down"][key] = entry["down"].get(key, 0) + down
        entry["up"][key] = entry["up"].get(key, 0) + up

    def record(self, seconds: float) -> dict:
        """The run's record, in the format of the in-process simulation's (plus ``flower``: traffic, names)."""
        users = sorted(self.facts)
        names = [self.facts[u]["name"] for u in users]
        curves = {self.facts[u]["name"]: self.curves.get(u, {}).get("test_ppl", []) for u in users}
        final = {n: c[-1] for n, c in curves.items() if c}
        state: dict = {}
        routing = {}
        for u in users:
            reports = self.final.get(u, {})
            for key, value in (reports.get("strategy_state") or {}).items():
                if isinstance(value, dict):
                    state.setdefault(key, {}).update(value)
                else:
                    state[key] = value
            if reports.get("routing"):
                routing[self.facts[u]["name"]] = reports["routing"]
        return {
            "strategy": self.run.strategy, "seed": self.run.seed, "users": names,
            "experts": [self.facts[u]["experts"] for u in users], "iterations": self.iterations,
            "test_ppl": curves, "final": final,
            "mean": sum(final.values()) / len(final) if final else math.nan,
            "pretrained": {n: c[0] for n, c in curves.items() if c},
            "train_loss": {self.facts[u]["name"]: self.curves.get(u, {}).get("train_loss", []) for u in users},
            "expert_scores": {self.facts[u]["name"]: self.curves.get(u, {}).get("scores", []) for u in users},
            "routing": routing, "strategy_state": state, "seconds": seconds, "via_server": False,
            "engine": "flower",
            "trainable_params": {self.facts[u]["name"]: self.facts[u]["trainable"] for u in users},
            "flower": {"traffic": self.traffic, "uploaded_names": sorted(self.uploaded_names)},
        }


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    """The connected node ids once at least ``count`` are connected.

    Raises:
        FlowerRunError: if fewer are connected after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FlowerRunError(f"{len(nodes)} of {count} devices connected within {timeout_s:.0f} s; start one "
                                 "SuperNode per device")
        time.sleep(0.5)
    return nodes


def serve(grid: Grid, run: FlowerRun, threads: int = 0) -> dict:
    """Run the federation on ``grid``; returns its record (see :meth:`CoMiGSStrategy.record`)."""
    start = time.perf_counter()
    strategy = CoMiGSStrategy(run, threads)
    initial = strategy.initialise(grid)
    strategy.start(grid, initial, num_rounds=run.sim.rounds, timeout=run.timeout_s)
    return strategy.record(time.perf_counter() - start)


def make_server_app(run: FlowerRun, results: list, threads: int = 0) -> ServerApp:
    """A ServerApp for a run in this process (Flower's simulation engine); the record is appended to ``results``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context) -> None:
        results.append(serve(grid, run, threads))

    return server


#: The deployed ServerApp (``flwr run``): settings from the app's run config; the record goes to ``out``.
app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    run = FlowerRun.from_run_config(dict(context.run_config))
    record = serve(grid, run)
    if run.out:
        path = Path(run.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record).encode())  # the launcher reads it as soon as it exists
        log.info("wrote the run's record to %s", path)
    else:
        raise ConfigError("the run config has no 'out' path: the run's record was not written")
