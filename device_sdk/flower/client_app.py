"""The Flower ``ClientApp``: one device of the federation, trained with the SDK's per-round device code.

Handlers (Flower 1.42's Message API):

- ``query`` ``init``: a fresh device (adapters from the run's seed) answers with its initial shared tensors and its
  facts (user index, rank, alpha) so that the server can start every device from common values;
- ``query`` ``hello``: a device whose SuperNode restarted (a new node id) answers with the same facts from its
  checkpoint folder, so that the server takes it back;
- ``train``: sync to the global version in the message (the arrays may be left out when the device already holds
  that version), train one round locally, reply with the shared tensors (an ArrayRecord: attention LoRA and
  generalists for CoMiGS; specialists and routers never leave the device) and a MetricRecord with the training
  tokens (``num-examples``), the train loss and the device's rank and alpha;
- ``evaluate``: sync to the new global (the strategy's receive step: the mean as is, a cut to the device's rank,
  PCL's trust-weighted mix scored on the device's validation data) and reply with the test perplexity, router scores
  and, in the last round, the strategy's per-device state (and the routing report, where the run asks for it).

Every message carries the run's settings (:class:`device_sdk.flower.wire.FlowerRun`) in its ConfigRecord.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .device import DeviceCache, device_spec, dumps
from .wire import ARRAYS, CONFIG, HELLO_QUERY, INIT_QUERY, METRICS, NUM_EXAMPLES, FlowerRun, from_record, to_record

log = logging.getLogger(__name__)

#: The devices this process ran (a Ray worker runs many; a SuperNode starts a process per message).
DEVICES = DeviceCache()

app = ClientApp()


def _settings(message: Message) -> tuple[FlowerRun, int | None, bool]:
    config = message.content[CONFIG]
    run = FlowerRun.from_json(str(config["run"]))
    threads = int(config.get("threads", 0))
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    version = int(config["version"]) if "version" in config else None
    return run, version, bool(config.get("final", False))


def _arrays(message: Message) -> dict[str, torch.Tensor]:
    return from_record(message.content[ARRAYS]) if ARRAYS in message.content else {}


@app.query(INIT_QUERY)
def initialise(message: Message, context: Context) -> Message:
    """A fresh device's initial shared tensors and facts."""
    run, _, _ = _settings(message)
    spec = device_spec(run, context.node_config, context.run_id)
    device = DEVICES.get(run, spec, fresh=True)
    device.save()
    content = RecordDict({ARRAYS: to_record(device.initial_tensors()), METRICS: MetricRecord(device.facts()),
                          CONFIG: ConfigRecord({"name": spec.name})})
    return Message(content, reply_to=message)


@app.query(HELLO_QUERY)
def hello(message: Message, context: Context) -> Message:
    """A device back after its SuperNode restarted: its facts, from its checkpoint folder (an error reply if it has
    none: a device that lost its state cannot rejoin a running run)."""
    run, _, _ = _settings(message)
    spec = device_spec(run, context.node_config, context.run_id)
    device = DEVICES.get(run, spec)
    content = RecordDict({METRICS: MetricRecord(device.facts()), CONFIG: ConfigRecord({"name": spec.name})})
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Sync, train one round, upload the shared tensors."""
    run, version, _ = _settings(message)
    device = DEVICES.get(run, device_spec(run, context.node_config, context.run_id))
    device.sync(version, _arrays(message))
    tensors, tokens, loss = device.train()
    device.version = None  # it trained: the next message's global (even the same version) is loaded again
    device.save()
    metrics = MetricRecord({**device.facts(), NUM_EXAMPLES: tokens, "train-loss": loss, "step": device.state.step})
    return Message(RecordDict({ARRAYS: to_record(tensors), METRICS: metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Load the new global and report test perplexity and router statistics."""
    run, version, final = _settings(message)
    device = DEVICES.get(run, device_spec(run, context.node_config, context.run_id))
    device.sync(version, _arrays(message))
    device.save()
    reports = {"scores": device.scores()}
    if final:
        reports["strategy_state"] = device.strategy.state
        if run.routing_report:  # decoded samples of the device's own test text: only where the run asks
            reports["routing"] = device.routing()
    metrics = MetricRecord({"user": device.spec.user, "test-ppl": device.test_perplexity(),
                            "step": device.state.step, NUM_EXAMPLES: 1})
    return Message(RecordDict({METRICS: metrics, CONFIG: ConfigRecord({"reports": dumps(reports)})}),
                   reply_to=message)
