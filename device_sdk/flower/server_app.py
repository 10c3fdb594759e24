"""The Flower ``ServerApp``: our round policy and our server rules on Flower's Message API.

:class:`CoMiGSStrategy` is a Flower strategy (``flwr.serverapp.strategy.Strategy``) whose aggregation is the
strategy's own server rule from :mod:`device_sdk.federated` (``RULES[spec.rule]``, the function the aggregator runs):
the mean (FedAvg, CoMiGS's generalists and attention LoRA, FFA-LoRA's B matrices), HetLoRA's padded
sparsity-weighted mean and FlexLoRA's SVD of the mean update over per-device ranks, PCL's relay of every upload.
Uploads are checked as the aggregator checks them, with the same functions (:func:`device_sdk.federated.validate`:
names, shapes at the device's rank, dtypes, finite values of at most ``max_abs_value``; a positive token count where
the rule weighs by tokens); a reply that is malformed or fails a check is dropped with a warning, never ends the
run. Each device's rank and alpha are the ones it declared at the start, not what a later reply says. A global
with NaN or Inf is not published. Each device then applies the strategy's receive step itself.

A run (:func:`serve`):

1. waits until ``devices`` nodes are connected and asks each for its initial shared tensors (``query`` ``init``);
   the devices must agree on the names and alpha and pass the checks above, else the run stops (a device set up
   wrongly); version 0 of the global is, per name, the largest of them (each device cuts it to its own shape), and
   the devices evaluate it (round 0 of the learning curves);
2. runs ``rounds`` rounds of Flower's strategy loop: ``train`` messages to the devices drawn for the round (a
   ``fraction`` of them, at least ``min_devices``), the server rule over the replies (published only if at least
   ``min_devices`` devices reported valid tensors), ``evaluate`` messages with the new global to every device.
   After a round that published nothing, every device gets the last published global back (as a networked
   :class:`~device_sdk.device.Device` resyncs), not its own trained tensors.

A device that already holds the global version a message refers to gets the message without arrays. The run's
record has the simulation's format (learning curves, router scores, strategy state; the routing report, which
holds decoded test text, only with ``routing_report``) plus the bytes each device sent and received per round and
which rounds published a global (``flower.rounds``). A missed evaluation is ``null`` in its user's curve.
A device whose SuperNode restarts comes back with a new node id: before each round the server asks new nodes who
they are (``query`` ``hello``) and takes a device back on its new node when its old one is gone.
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

from ..config import positive_number
from ..errors import ConfigError, SDKError
from ..federated import (RULES, InvalidUpload, TensorSpec, Upload, largest, networked_spec, nonfinite, spec_of,
                         validate)
from ..federated.rules import check_tokens
from ..federated.wire import MAX_TOKENS
from ..fileio import atomic_write_bytes
from .wire import ARRAYS, CONFIG, HELLO_QUERY, INIT_QUERY, METRICS, NUM_EXAMPLES, FlowerRun, from_record, to_record

#: How long the server waits for a node that joined mid-run to say who it is (a device loads its model to answer),
#: and how many rounds it asks a node that does not answer at all.
HELLO_TIMEOUT_S = 300.0
HELLO_TRIES = 3

log = logging.getLogger(__name__)


class FlowerRunError(SDKError):
    """A Flower run could not start (devices missing, or set up differently), or it published no global at all."""


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
        self.curves: dict[int, dict] = {}  # user -> scores, train loss
        self.evaluations: list[dict[int, float]] = []  # per evaluation round: user -> test ppl
        self.iterations: list[int] = []
        self.published: dict[int, bool] = {}  # round -> whether it published a global
        self.final: dict[int, dict] = {}  # user -> routing, strategy state (last round)
        self.traffic: list[dict] = []  # per round: bytes down / up per user
        self.uploaded_names: set[str] = set()
        self.strangers: set[int] = set()  # nodes that joined mid-run and are no device of this run
        self.asked: dict[int, int] = {}  # node -> hello queries it left unanswered

    # --- start: devices and version 0 -------------------------------------------------------------------------------
    def initialise(self, grid: Grid) -> ArrayRecord:
        """Wait for the devices, collect their initial shared tensors, evaluate version 0; returns version 0.

        Raises:
            FlowerRunError: if the devices do not all connect and answer within ``timeout_s``, or answer with
                facts or tensors that do not agree (another base model or strategy, a duplicate user index, values
                beyond ``max_abs_value``).
        """
        nodes = wait_for_nodes(grid, self.run.devices, self.run.timeout_s)
        if len(nodes) > self.run.devices:
            log.warning("%d nodes are connected and the run takes %d devices: nodes %s are left out", len(nodes),
                        self.run.devices, nodes[self.run.devices:])
            nodes = nodes[:self.run.devices]
        self._round_traffic(0)
        messages = [self._message(node, f"{MessageType.QUERY}.{INIT_QUERY}", None, 0) for node in nodes]
        uploads = []
        for reply in self._replies(grid.send_and_receive(messages, timeout=self.run.timeout_s), "init"):
            node = reply.metadata.src_node_id
            try:
                user, facts = self._facts(reply)
                tensors = from_record(reply.content[ARRAYS])
            except (KeyError, TypeError, ValueError) as err:
                raise FlowerRunError(f"the device on node {node} answered the init query without its facts or "
                                     f"tensors ({err!r}); every SuperNode must run this SDK's ClientApp") from err
            if user in self.facts:
                raise FlowerRunError(f"two devices say they are user {user}; give each SuperNode its own "
                                     "--node-config user=INDEX")
            if facts["rank"] < 1 or not positive_number(facts["alpha"]):
                raise FlowerRunError(f"device {user} declared rank {facts['rank']} and alpha {facts['alpha']}; "
                                     "both must be positive")
            self.users[node], self.facts[user] = user, facts
            self._count(0, user, up=reply.content[ARRAYS].count_bytes())
            uploads.append(Upload(user, tensors, 0, facts["rank"], facts["alpha"]))
        if len(uploads) < self.run.devices:
            raise FlowerRunError(f"only {len(uploads)} of {self.run.devices} devices answered the init query; see "
                                 "the devices' logs")
        uploads.sort(key=lambda u: u.user)
        self._check_agreement(uploads)
        names = sorted(uploads[0].tensors)
        initial = {name: largest(uploads, name) for name in names}  # each device cuts it to its own shape
        self.global_spec = spec_of(initial)
        for upload in uploads:
            try:
                validate(upload.tensors, self.upload_spec(upload.user, initial=True), self.run.max_abs_value)
            except InvalidUpload as err:
                raise FlowerRunError(f"device {upload.user}'s initial tensors: {err.message}") from err
        arrays = to_record(initial)
        self._evaluate_round(0, grid, arrays)
        return arrays

    @staticmethod
    def _facts(reply: Message) -> tuple[int, dict]:
        """The user index and facts a device declares (init and hello replies).

        Raises:
            KeyError, TypeError, ValueError: for a reply without them.
        """
        metrics = reply.content[METRICS]
        return int(metrics["user"]), {"rank": int(metrics["rank"]), "alpha": float(metrics["alpha"]),
                                      "experts": int(metrics["experts"]),
                                      "trainable": int(metrics["trainable-params"]),
                                      "name": str(reply.content[CONFIG]["name"])}

    def take_back(self, grid: Grid, server_round: int) -> None:
        """Ask each node that joined since the start who it is; a device of this run whose old node is gone (its
        SuperNode restarted) is taken back on its new node, and gets the next global whole (while the old node is
        still listed, or the new one did not answer, it is asked again next round, :data:`HELLO_TRIES` times at
        most). A node that answers as no device of this run is left out, and not asked again."""
        connected = set(grid.get_node_ids())
        new = sorted(connected - set(self.users) - self.strangers)
        if not new:
            return
        messages = [self._message(node, f"{MessageType.QUERY}.{HELLO_QUERY}", None, server_round) for node in new]
        replies = list(grid.send_and_receive(messages, timeout=min(HELLO_TIMEOUT_S, self.run.timeout_s)))
        answered = {reply.metadata.src_node_id for reply in replies}
        for node in new:
            if node not in answered:
                self.asked[node] = self.asked.get(node, 0) + 1
                if self.asked[node] >= HELLO_TRIES:
                    log.warning("node %d joined mid-run and did not answer %d times; it is left out", node,
                                HELLO_TRIES)
                    self.strangers.add(node)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():  # the ClientApp could not answer: no state folder for this run
                log.warning("node %d joined mid-run and is no device of this run (%s); it is left out", node,
                            reply.error.reason)
                self.strangers.add(node)
                continue
            try:
                user, facts = self._facts(reply)
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                log.warning("node %d joined mid-run and did not say who it is (%r); it is left out", node, err)
                self.strangers.add(node)
                continue
            if self.facts.get(user) != facts:
                log.warning("node %d joined mid-run as user %d with other facts than that device had at the start "
                            "(%s, then %s); it is left out", node, user, facts, self.facts.get(user))
                self.strangers.add(node)
                continue
            old = [n for n, u in self.users.items() if u == user]
            if any(n in connected for n in old):
                log.warning("node %d says it is user %d, which is still connected on node %s; asking again next "
                            "round", node, user, old)
                continue
            for n in old:
                del self.users[n]
                self.holds.pop(n, None)
            self.users[node] = user
            log.info("device %d (%s) is back, on node %d", user, facts["name"], node)

    @staticmethod
    def _check_agreement(uploads: list[Upload]) -> None:
        """Every device must send the same tensor names and alpha: one base model, one strategy, one run config.

        Raises:
            FlowerRunError: naming the first device that differs from device ``uploads[0].user``.
        """
        first = uploads[0]
        for upload in uploads[1:]:
            if set(upload.tensors) != set(first.tensors):
                extra = sorted(set(upload.tensors) - set(first.tensors))[:3]
                missing = sorted(set(first.tensors) - set(upload.tensors))[:3]
                raise FlowerRunError(f"device {upload.user} shares other tensors than device {first.user} (its own: "
                                     f"{extra}, lacking {missing}); every device must run the same base model and "
                                     "strategy")
            if upload.alpha != first.alpha:
                raise FlowerRunError(f"device {upload.user} has alpha {upload.alpha}, device {first.user} "
                                     f"{first.alpha}; every device must run the same run config")

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
        self.take_back(grid, server_round)
        messages = [self._message(node, MessageType.TRAIN, arrays, server_round) for node in self._sample(server_round)]
        for message in messages:  # a device that trains no longer holds the global it started from, even if its
            self.holds.pop(message.metadata.dst_node_id, None)  # reply is lost: it gets the next global whole
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        final = server_round == self.run.sim.rounds
        return [self._message(node, MessageType.EVALUATE, arrays, server_round, final) for node in self.users]

    # --- aggregation ------------------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's server rule over the valid uploads, in user order (``None`` below the quorum, or when the
        rule fails or gives NaN/Inf: the round then publishes nothing)."""
        uploads, losses = [], {}
        for reply in self._replies(replies, f"round {server_round} train"):
            node = reply.metadata.src_node_id
            try:
                upload, loss = self._upload(server_round, node, reply)
            except (InvalidUpload, AttributeError, KeyError, TypeError, ValueError) as err:
                log.warning("round %d: dropped the reply of node %d: %s", server_round, node,
                            err.message if isinstance(err, InvalidUpload) else repr(err))
                continue
            self.uploaded_names.update(upload.tensors)
            uploads.append(upload)
            losses[upload.user] = loss
        for user, loss in losses.items():
            self.curves.setdefault(user, {}).setdefault("train_loss", []).append(loss)
        self.published[server_round] = False
        if len(uploads) < self.run.quorum:
            log.warning("round %d: %d valid upload(s), fewer than min_devices=%d; the global stays at version %d",
                        server_round, len(uploads), self.run.quorum, self.version)
            return None, None
        uploads.sort(key=lambda u: u.user)
        try:
            merged = self.rule(uploads)
        except Exception:  # noqa: BLE001 - a rule's failure fails the round, not the run (as on the aggregator)
            log.exception("round %d: the %s rule failed; the global stays at version %d", server_round,
                          self.spec.rule, self.version)
            return None, None
        bad = nonfinite(merged)
        if bad:
            log.error("round %d: the aggregated global has NaN or Inf in %d tensor(s), e.g. %s; it was not "
                      "published (the global stays at version %d)", server_round, len(bad), bad[:3], self.version)
            return None, None
        self.version = server_round
        self.published[server_round] = True
        tokens = sum(u.tokens for u in uploads)
        metrics = MetricRecord({"devices": len(uploads), NUM_EXAMPLES: tokens,
                                "train-loss": sum(losses.values()) / len(losses)})
        return to_record(merged), metrics

    def _upload(self, server_round: int, node: int, reply: Message) -> tuple[Upload, float]:
        """One train reply as an :class:`Upload` (the device's declared rank and alpha) and its train loss.

        Raises:
            InvalidUpload, KeyError, TypeError, ValueError: a reply from a node outside the run, without its records,
                or whose tensors or numbers fail the checks.
        """
        if node not in self.users:
            raise InvalidUpload(f"node {node} is not one of the run's devices")
        user = self.users[node]
        metrics, record = reply.content[METRICS], reply.content[ARRAYS]
        self._count(server_round, user, up=record.count_bytes())
        tensors = from_record(record)
        validate(tensors, self.upload_spec(user), self.run.max_abs_value)
        tokens, loss = metrics[NUM_EXAMPLES], float(metrics["train-loss"])
        if not isinstance(tokens, int) or not 0 <= tokens <= MAX_TOKENS:
            raise InvalidUpload(f"{NUM_EXAMPLES} must be an integer in [0, {MAX_TOKENS}], got {tokens!r}")
        if self.spec.weighs_by_tokens:
            check_tokens(tokens, self.spec.name)
        facts = self.facts[user]
        return Upload(user, tensors, tokens, facts["rank"], facts["alpha"]), loss

    def upload_spec(self, user: int, initial: bool = False) -> dict[str, TensorSpec]:
        """What device ``user`` must upload: the strategy's travelling tensors (``initial``: every shared tensor, as
        at the start) at the device's shapes (its rank)."""
        shapes, rank = {name: s.shape for name, s in self.global_spec.items()}, self.facts[user]["rank"]
        shapes = self.spec.device_shapes(shapes, rank) if initial else self.spec.upload_shapes(shapes, rank)
        return {name: TensorSpec(tuple(shape), self.global_spec[name].dtype) for name, shape in shapes.items()}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every device's test perplexity, router scores (and, last, its strategy state and routing report),
        under the user the node is (never the index a reply names)."""
        steps, ppl = [], {}
        for reply in self._replies(replies, f"round {server_round} evaluate"):
            node = reply.metadata.src_node_id
            try:
                user = self.users[node]
                metrics = reply.content[METRICS]
                value, step = float(metrics["test-ppl"]), int(metrics["step"])
                reports = json.loads(str(reply.content[CONFIG]["reports"]))
                scores = reports["scores"]
            except (AttributeError, KeyError, TypeError, ValueError) as err:  # json's errors are ValueErrors
                log.warning("round %d: dropped the evaluation of node %d: %r", server_round, node, err)
                continue
            self.holds[node] = self.version
            self.curves.setdefault(user, {}).setdefault("scores", []).append({"iteration": step, "layers": scores})
            if "strategy_state" in reports:
                self.final[user] = reports
            steps.append(step)
            ppl[user] = value
        if not ppl:
            log.warning("round %d: no device reported its evaluation", server_round)
            return None
        self.evaluations.append(ppl)
        self.iterations.append(min(steps))
        return MetricRecord({"test-ppl": sum(ppl.values()) / len(ppl), "devices": len(ppl)})

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
        curves = {self.facts[u]["name"]: [e.get(u) for e in self.evaluations] for u in users}
        final = {n: c[-1] for n, c in curves.items() if c and c[-1] is not None}
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
            "pretrained": {n: c[0] for n, c in curves.items() if c and c[0] is not None},
            "train_loss": {self.facts[u]["name"]: self.curves.get(u, {}).get("train_loss", []) for u in users},
            "expert_scores": {self.facts[u]["name"]: self.curves.get(u, {}).get("scores", []) for u in users},
            "routing": routing, "strategy_state": state, "seconds": seconds, "via_server": False,
            "engine": "flower",
            "trainable_params": {self.facts[u]["name"]: self.facts[u]["trainable"] for u in users},
            "flower": {"traffic": self.traffic, "uploaded_names": sorted(self.uploaded_names),
                       "rounds": [{"round": r, "published": p} for r, p in sorted(self.published.items())]},
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
    record = strategy.record(time.perf_counter() - start)
    if nothing_published(record):
        log.error("no round of %d published a global (see the warnings above): the record holds version 0 only",
                  run.sim.rounds)
    return record


def nothing_published(record: dict) -> bool:
    """Whether a run's record has rounds and none of them published a global."""
    rounds = record["flower"]["rounds"]
    return bool(rounds) and not any(r["published"] for r in rounds)


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
    from ..sim.runner import jsonable

    run = FlowerRun.from_run_config(dict(context.run_config))
    if not run.out:  # before the run, not after hours of it
        raise ConfigError("the run config has no 'out' path for the run's record; set out = \"FILE.json\"")
    path = Path(run.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = serve(grid, run)
    atomic_write_bytes(path, json.dumps(jsonable(record)).encode())  # the launcher reads it as soon as it exists
    log.info("wrote the run's record to %s", path)
    if nothing_published(record):
        raise FlowerRunError(f"no round published a global; the record in {path} holds version 0 only")
