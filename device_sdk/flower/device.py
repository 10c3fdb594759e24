"""One device of a Flower federation: the same per-round device code as the in-process simulation.

A Flower ``ClientApp`` is called once per message, possibly in another process each time (a SuperNode starts one per
message; Ray gives a message to whichever worker is free), so the device keeps its state where a real device does:
a checkpoint folder (adapters, optimizer states, batch sampler, step, the strategy's per-device state and the global
version it loaded), written after every message. A process that handles the same device twice in a row reuses the
model it holds if the folder's latest checkpoint is still the one it wrote.

Every step is the simulation's: the model (:func:`~device_sdk.sim.runner.user_model`, adapters initialised from the
run's seed), the training settings (:meth:`~device_sdk.sim.config.SimConfig.train_config`), one device round
(:func:`device_sdk.round.run_device_round`) and the receive step (:func:`device_sdk.round.receive_global`), the
evaluations (test perplexity, router scores, the routing report). So a run on Flower gives the numbers of
``--engine local``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..data import UserData, eval_windows, load_user_data
from ..errors import ConfigError
from ..evaluate import evaluate, loss_with
from ..inject import adapter_config
from ..models import BaseModel, default_cache_dir, load_base_model
from ..parts import Role, count_parameters
from ..sim.config import SimConfig, cap_training
from ..round import load_initial, receive_global, run_device_round
from ..sim.runner import expert_scores, routing_report, user_model
from ..strategies import make_strategy
from ..train import init_train_state
from .wire import FlowerRun, sim_config_to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """Who a Flower node is.

    Attributes:
        user: the device's index in the federation (its seed offset and its key in strategy states).
        name: the user's name (its data folder's name).
        experts: LoRA modules per MLP projection its hardware holds.
        data: its token streams.
        texts: ``{user: token stream}`` the routing report samples from.
        state_dir: its checkpoint folder for this run.
    """

    user: int
    name: str
    experts: int
    data: UserData
    texts: dict[str, np.ndarray]
    state_dir: Path


@functools.lru_cache(maxsize=2)
def cached_base(name: str, cache_dir: str, device: str) -> BaseModel:
    """The frozen base model, loaded once per process and shared by every device the process runs."""
    base = load_base_model(name, cache_dir=Path(cache_dir))
    base.model.to(device)
    return base


@functools.lru_cache(maxsize=2)
def _simulation_users(cfg_json: str) -> tuple[list[UserData], dict[str, np.ndarray]]:
    from ..sim.simulate import prepare_users
    from .wire import sim_config_from_json

    cfg = sim_config_from_json(cfg_json)
    cache = cache_dir_of(cfg)
    users, texts = prepare_users(cfg, cached_base(cfg.model, str(cache), cfg.device).tokenizer, cache)
    return users, texts or {u.name: u.test for u in users}


def cache_dir_of(cfg: SimConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def device_spec(run: FlowerRun, node_config: dict, run_id: int) -> DeviceSpec:
    """The device a node is, from its node config.

    A deployed SuperNode names its own data (``--node-config 'data="DIR" user=0 experts=2 state="DIR"'``); a virtual
    node of a simulation is user ``partition-id`` of the simulation's split folder (prepared exactly as the
    in-process simulation prepares it).

    Raises:
        ConfigError: for a node config that names neither.
    """
    cfg = run.sim
    if "data" in node_config:
        folder = Path(str(node_config["data"]))
        user = int(node_config.get("user", 0))
        cache = cache_dir_of(cfg)
        tokenizer = cached_base(cfg.model, str(cache), cfg.device).tokenizer
        data = cap_training([load_user_data(folder, tokenizer, cache_dir=cache / "tokens")], cfg.train_tokens,
                            cfg.train_prefix, cfg.valid_prefix)[0]
        experts = int(node_config.get("experts", cfg.experts[0]))
        root = Path(str(node_config.get("state", Path("flower-state") / data.name)))
        return DeviceSpec(user, str(node_config.get("name", data.name)), experts, data, {data.name: data.test},
                          root / f"run-{run_id}")
    if "partition-id" not in node_config:
        raise ConfigError(f"node config {dict(node_config)} names no data: start the SuperNode with --node-config "
                          "'data=\"USER_FOLDER\" user=INDEX experts=N state=\"STATE_DIR\"'")
    users, texts = _simulation_users(sim_config_to_json(cfg))
    user = int(node_config["partition-id"])
    if user >= len(users):
        raise ConfigError(f"virtual device {user} has no user: {cfg.data} holds {len(users)}")
    experts = cfg.experts_for(len(users))[user]
    return DeviceSpec(user, users[user].name, experts, users[user], texts,
                      Path(run.state_root) / f"run-{run_id}" / f"user{user:03d}")


class FlowerDevice:
    """A device's model, training state and strategy, restored from and saved to its checkpoint folder."""

    def __init__(self, run: FlowerRun, spec: DeviceSpec) -> None:
        cfg = run.sim
        self.run, self.spec, self.cfg = run, spec, cfg
        self.base = cached_base(cfg.model, str(cache_dir_of(cfg)), cfg.device)
        self.strategy = make_strategy(run.strategy)
        self.model = user_model(self.base.model, self.strategy, spec.user, spec.experts, run.seed, cfg.mixing)
        self.train_cfg = cfg.train_config(self.strategy, spec.user, run.seed)
        self.state = init_train_state(self.model, self.train_cfg)
        self.version: int | None = None  # the global version loaded
        self.revision = 0  # checkpoints written (names them)
        self.checkpoint: str | None = None
        self.score_batch = next(eval_windows(spec.data.valid, cfg.ctx, max(1, cfg.peer_eval_tokens // cfg.ctx)))[0]

    # state ---------------------------------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the latest checkpoint of the device's folder, if any; True if one was loaded."""
        path = latest_checkpoint(self.spec.state_dir)
        if path is None:
            return False
        info = load_checkpoint(path, self.model, self.state, self.base.name)
        self.version, self.revision = info["global_version"], int(info["round"])
        self.strategy.state = info.get("strategy_state", {})
        self.checkpoint = path.name
        return True

    def save(self) -> None:
        self.revision += 1
        path = save_checkpoint(self.spec.state_dir, self.model, self.state, self.base.name,
                               {"round": self.revision, "global_version": self.version,
                                "strategy_state": self.strategy.state})
        self.checkpoint = path.name

    def is_current(self) -> bool:
        """Whether the device's folder still holds the checkpoint this object wrote or loaded last."""
        latest = latest_checkpoint(self.spec.state_dir)
        return latest is not None and latest.name == self.checkpoint

    # one round ---------------------------------------------------------------------------------------------------
    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """The shared tensors as initialised (before round 1; FFA-LoRA's fixed A included)."""
        return self.strategy.initial_tensors(self.model)

    def own_loss(self, tensors: dict[str, torch.Tensor]) -> float:
        """Validation loss with ``tensors`` loaded in place of the device's shared tensors (PCL's peer score)."""
        return loss_with(self.model, tensors, self.spec.data.valid, self.cfg.ctx, max(8, self.cfg.batch),
                         self.cfg.precision, max_tokens=self.cfg.peer_eval_tokens)

    def sync(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """Load global ``version`` unless it is loaded already: version 0 (the largest initial tensors) cut to the
        device's shapes, later versions through the strategy's receive step.

        Raises:
            ConfigError: if the version is new but no tensors came with it.
        """
        if version == self.version:
            return
        if not tensors:
            raise ConfigError(f"device {self.spec.user} holds global version {self.version}, but version {version} "
                              "came without tensors")
        if version == 0:  # the union over devices: this device's names only
            load_initial(self.strategy, self.model, {name: tensors[name] for name in self.initial_tensors()})
        else:
            receive_global(self.strategy, self.spec.user, self.model, tensors, self.own_loss)
        self.version = version

    def train(self) -> tuple[dict[str, torch.Tensor], int, float]:
        """One round of local training; returns the shared tensors to upload, the training tokens and the mean
        training loss."""
        done = run_device_round(self.strategy, self.spec.user, self.model, self.state, self.spec.data,
                                self.train_cfg)
        self.state = done.state
        return done.upload.tensors, done.upload.tokens, done.train_loss

    def test_perplexity(self) -> float:
        cfg = self.cfg
        return evaluate(self.model, self.spec.data.test, cfg.ctx, max(8, cfg.batch), cfg.precision,
                        max_tokens=cfg.eval_tokens, spread=True).perplexity

    def scores(self) -> list[dict]:
        """Router weight of generalists vs specialists per layer (empty without learned routers)."""
        if self.strategy.router_mode == "fixed":
            return []
        return expert_scores(self.model, self.score_batch, self.cfg.precision)

    def routing(self) -> list[dict]:
        """The routing report's samples of this device's model (empty without learned routers)."""
        if self.strategy.router_mode == "fixed":
            return []
        report = routing_report([self.model], [self.spec.name], self.spec.texts, self.base.tokenizer,
                                self.cfg.precision)
        return report.get(self.spec.name, [])

    def facts(self) -> dict:
        """What the server needs to know about the device: its rank and alpha (for the server rule) and size."""
        adapter = adapter_config(self.model)
        counts = count_parameters(self.model)
        return {"user": self.spec.user, "rank": adapter.rank, "alpha": float(adapter.alpha),
                "experts": self.spec.experts, "trainable-params": sum(counts[r.value] for r in Role)}


class DeviceCache:
    """The devices one process has run, by checkpoint folder, reused while their folder is unchanged."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.devices: dict[Path, FlowerDevice] = {}

    def get(self, run: FlowerRun, spec: DeviceSpec, fresh: bool = False) -> FlowerDevice:
        """The device ``spec`` at its latest checkpoint (``fresh``: newly initialised, its folder emptied)."""
        device = self.devices.pop(spec.state_dir, None)
        if fresh or device is None or device.run != run or not device.is_current():
            device = FlowerDevice(run, spec)
            if fresh:
                _clear(spec.state_dir)
            elif not device.restore():
                raise ConfigError(f"device {spec.user} has no checkpoint in {spec.state_dir}: the server must send "
                                  "the init query first")
        self.devices[spec.state_dir] = device
        while len(self.devices) > self.size:
            self.devices.pop(next(iter(self.devices)))
        return device


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def dumps(value) -> str:
    """JSON of a report (non-finite floats as null, as in the simulation's records)."""
    from ..sim.runner import jsonable

    return json.dumps(jsonable(value))
