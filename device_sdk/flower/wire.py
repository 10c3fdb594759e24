"""What travels between our ServerApp and ClientApp: record keys, tensors as ArrayRecords, the run's settings.

Every message holds up to three records: ``arrays`` (an :class:`~flwr.app.ArrayRecord` of shared tensors, by
parameter name), ``metrics`` (a :class:`~flwr.app.MetricRecord` of numbers) and ``config`` (a
:class:`~flwr.app.ConfigRecord`: the run's settings from the server; JSON reports from a device). Only the shared
tensors of the strategy (attention LoRA and generalists for CoMiGS) are ever put in an ``arrays`` record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from ..config import positive_number
from ..errors import ConfigError
from ..federated.catalog import spec_for
from ..federated.tensors import DEFAULT_MAX_ABS
from ..sim.config import SimConfig

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
#: The metric a reply's training tokens travel under (Flower's convention for the weight of an update).
NUM_EXAMPLES = "num-examples"
#: ``query`` messages of this name ask a device for its freshly initialised shared tensors (before round 1).
INIT_QUERY = "init"
#: ``query`` messages of this name ask a node that joined mid-run who it is: a device whose SuperNode restarted
#: answers from its checkpoint folder (its facts, as at the start), and the server takes it back.
HELLO_QUERY = "hello"

#: SimConfig fields holding tuples (JSON gives lists back).
_TUPLE_FIELDS = {"strategies", "experts", "seeds", "users", "routing_layers", "betas"}


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``{name: tensor}`` (any device) as an ArrayRecord of CPU copies, names kept."""
    return ArrayRecord({name: Array(t.detach().cpu().contiguous().numpy()) for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as ``{name: tensor}`` (writable CPU tensors, dtypes and bits kept)."""
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def sim_config_to_json(cfg: SimConfig) -> str:
    """The settings every device trains with, as JSON (paths as strings)."""
    return json.dumps(asdict(cfg), default=str)


def sim_config_from_json(text: str) -> SimConfig:
    """The inverse of :func:`sim_config_to_json`."""
    raw = json.loads(text)
    known = {f.name for f in fields(SimConfig)}
    settings = {k: v for k, v in raw.items() if k in known}
    for name in _TUPLE_FIELDS:
        if settings.get(name) is not None:
            settings[name] = tuple(settings[name])
    settings["train_tokens"] = tuple(tuple(pair) for pair in settings.get("train_tokens", ()))
    settings["data"] = Path(settings["data"])
    if settings.get("cache_dir") is not None:
        settings["cache_dir"] = Path(settings["cache_dir"])
    return SimConfig(**settings)


@dataclass(frozen=True)
class FlowerRun:
    """One federated run on Flower: the settings the ServerApp fixes and sends to every device.

    Attributes:
        sim: training and evaluation settings (rounds, local steps, batch, learning rates, ...; the same fields a
            simulation uses). In a simulation ``sim.data`` is the split folder whose users the virtual devices are.
        strategy: the collaboration strategy (one that shares tensors through a server).
        seed: seed of the adapters' initialisation and of batch sampling (device ``i`` samples with
            ``seed * 1000 + i``, as in the in-process simulation).
        devices: how many devices take part; the run starts once that many are connected.
        min_devices: a round's global is published only if at least this many devices reported (``None``: all).
        fraction: the fraction of devices that train each round (at least ``min_devices``), drawn with ``seed``.
        state_root: simulation only: where virtual devices keep their checkpoints between rounds.
        timeout_s: how long the server waits for a round's replies.
        out: write the run's record (JSON) here when it ends (a deployment's result; empty: do not).
        max_abs_value: the largest |value| an uploaded tensor may hold (as the aggregator's setting).
        routing_report: devices send, with their last evaluation, the routing report: samples of their own test
            text, decoded, with each token's expert. Off by default: it is the device's text leaving it; a
            simulation turns it on (its users are the operator's own data).
    """

    sim: SimConfig
    strategy: str
    seed: int = 1
    devices: int = 2
    min_devices: int | None = None
    fraction: float = 1.0
    state_root: str = ""
    timeout_s: float = 3600.0
    out: str = ""
    max_abs_value: float = DEFAULT_MAX_ABS
    routing_report: bool = False

    def __post_init__(self) -> None:
        problems = []
        try:
            if not spec_for(self.strategy).collaborative:
                problems.append(f"strategy {self.strategy!r} shares nothing through a server; run it in-process")
        except ConfigError as err:
            problems.append(str(err))
        if self.devices < 1:
            problems.append(f"devices must be >= 1, got {self.devices}")
        if self.min_devices is not None and not 1 <= self.min_devices <= self.devices:
            problems.append(f"min_devices must be between 1 and devices ({self.devices}), got {self.min_devices}")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {self.fraction}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if not positive_number(self.max_abs_value):
            problems.append(f"max_abs_value must be a positive finite number, got {self.max_abs_value!r}")
        if problems:
            raise ConfigError("invalid Flower run: " + "; ".join(problems))

    @property
    def quorum(self) -> int:
        """The fewest reports a round needs."""
        return self.devices if self.min_devices is None else self.min_devices

    def to_json(self) -> str:
        fields_ = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sim"}
        return json.dumps({**fields_, "sim": json.loads(sim_config_to_json(self.sim))})

    @classmethod
    def from_json(cls, text: str) -> FlowerRun:
        raw = json.loads(text)
        return cls(**{**raw, "sim": sim_config_from_json(json.dumps(raw["sim"]))})

    @classmethod
    def from_run_config(cls, run_config: dict) -> FlowerRun:
        """A run from a Flower app's run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config``): keys
        spelled as on the command line (``local-steps``); run fields (``strategy``, ``seed``, ``devices``,
        ``min-devices``, ``fraction``, ``timeout-s``, ``out``, ``max-abs-value``, ``routing-report``) and any
        :class:`SimConfig` field.

        Raises:
            ConfigError: for an unknown key or a bad value.
        """
        own = {f.name for f in fields(cls)} - {"sim", "state_root"}
        sim_fields = {f.name for f in fields(SimConfig)} - {"data", "strategies", "seeds", "extra", "engine",
                                                           "via_server", "client_cpus", "flower_cpus"}
        run, sim, unknown = {}, {}, []
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in own:
                run[name] = value
            elif name in sim_fields:
                sim[name] = value
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"unknown run config keys {sorted(unknown)}; known: "
                              f"{sorted(k.replace('_', '-') for k in own | sim_fields)}")
        if run.get("min_devices") in (0, None):  # a TOML file cannot say None
            run["min_devices"] = None
        if sim.get("eval_tokens") == 0:
            sim["eval_tokens"] = None
        if isinstance(sim.get("experts"), int):
            sim["experts"] = (sim["experts"],)
        for name in ("experts", "routing_layers", "betas"):
            if isinstance(sim.get(name), str):
                sim[name] = tuple(float(v) if name == "betas" else int(v) for v in sim[name].split(",") if v)
        if "strategy" not in run:
            raise ConfigError("the run config has no 'strategy'")
        return cls(sim=SimConfig(data=Path(""), strategies=(run["strategy"],), **sim), **run)
