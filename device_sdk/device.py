"""A federated device: the object an edge app embeds. It holds the base model, the device's adapters and data,
and runs Algorithm 1's rounds against the aggregator; specialists and routers never leave it."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .adapters import assign_tensors
from .budget import model_shape, specialists_for_budget
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .client import AggregatorClient, RetryPolicy, ServerRejected
from .config import TrainConfig
from .data import UserData, load_user_data
from .errors import ConfigError
from .evaluate import evaluate, loss_with
from .inject import inject_adapters
from .models import default_cache_dir, load_base_model
from .parts import role_parameters
from .strategies import DEFAULT_NETWORKED, Upload, fit, networked_strategy
from .strategies.base import device_upload
from .train import init_train_state, train_local, valid_loss

log = logging.getLogger(__name__)

CREDENTIALS = "credentials.json"


@dataclass(frozen=True)
class DeviceConfig:
    """A device taking part in a federation.

    Attributes:
        server: the aggregator's URL.
        data: the user's data folder.
        state_dir: where credentials and checkpoints live (a device restarted with the same folder resumes).
        enroll_secret: the admin's enrollment secret (needed only the first time).
        model: base model name (must match the federation's).
        train: local training; ``steps`` is the number of expert steps per round.
        rounds: rounds to take part in (counted across restarts).
        n_specialists: specialist count; ``None`` picks it from ``budget_mb`` (1 without a budget).
        strategy: the federation's collaboration strategy (see :func:`device_sdk.strategies.networked_strategy`);
            strategies with two modules everywhere (fedavg, pfedmoe, pcl, ffa-lora, comigs-2s/2g/1g1s) ignore the
            specialist count; hetlora-*/flexlora-* turn it into one LoRA of a matching rank.
        eval_tokens: test tokens for the per-round test perplexity (``None``: the whole test set, 0: skip).
        peer_eval_tokens: validation tokens per peer model where the strategy scores peers (pcl).
    """

    server: str
    data: Path
    state_dir: Path
    enroll_secret: str | None = None
    model: str = "smollm2-135m"
    name: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=10))
    rounds: int = 3
    rank: int = 8
    alpha: float = 16.0
    n_specialists: int | None = None
    budget_mb: float | None = None
    eval_tokens: int | None = 0
    poll_s: float = 0.2
    seed: int = 0
    cache_dir: Path | None = None
    retry: RetryPolicy = RetryPolicy()
    strategy: str = DEFAULT_NETWORKED
    peer_eval_tokens: int = 2048

    def __post_init__(self) -> None:
        networked_strategy(self.strategy)  # fails early, naming the supported strategies
        problems = []
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if self.n_specialists is not None and self.n_specialists < 0:
            problems.append(f"n_specialists must be >= 0, got {self.n_specialists}")
        if self.budget_mb is not None and self.budget_mb <= 0:
            problems.append(f"budget_mb must be > 0, got {self.budget_mb}")
        if self.peer_eval_tokens < 1:
            problems.append(f"peer_eval_tokens must be >= 1, got {self.peer_eval_tokens}")
        if problems:
            raise ConfigError("invalid DeviceConfig: " + "; ".join(problems))


@dataclass
class RoundReport:
    round: int
    accepted: bool
    tokens: int
    train_loss: float
    valid_loss: float
    test_perplexity: float | None
    seconds: float
    reason: str = ""


class Device:
    """Base model + adapters + data + training state of one device, synchronised with the aggregator."""

    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cache = cfg.cache_dir or default_cache_dir()
        base = load_base_model(cfg.model, cache_dir=cache)  # every device shares one base
        self.base_name = base.name
        self.tokenizer = base.tokenizer
        self.strategy = networked_strategy(cfg.strategy)
        self.strategy.rank = cfg.rank  # one expert's rank; rank-per-device strategies scale it
        n_experts = 1 + self._specialist_count(base.model)
        self.adapter = replace(self.strategy.adapter_config(0, n_experts), alpha=cfg.alpha)
        torch.manual_seed(cfg.seed)
        # on the training config's device (adapters initialised on the CPU); uploads leave as CPU copies
        self.model = inject_adapters(base.model, self.adapter).to(cfg.train.device)
        self.strategy.prepare(0, self.model)
        self.data: UserData = load_user_data(cfg.data, base.tokenizer, cache_dir=cache)
        schedule = cfg.train.steps * cfg.rounds
        self.train_cfg = replace(cfg.train, schedule_steps=max(schedule, cfg.train.schedule_steps or 0),
                                 seed=cfg.seed, **self.strategy.train_overrides())
        self.state = init_train_state(self.model, self.train_cfg)
        self.completed_rounds = 0  # rounds this device uploaded to (or tried to)
        self.last_round = 0
        self.global_version: int | None = None
        checkpoint = latest_checkpoint(self.state_dir / "checkpoints")
        if checkpoint is not None:
            info = load_checkpoint(checkpoint, self.model, self.state, self.base_name)
            self.completed_rounds, self.last_round = info["completed_rounds"], info["round"]
            self.global_version = info["global_version"]
            self.strategy.state = info.get("strategy_state", {})
            log.info("resumed from %s (round %d, %d round(s) done)", checkpoint.name, self.last_round,
                     self.completed_rounds)
        self.client = AggregatorClient(cfg.server, self._credentials()["token"], cfg.retry)

    def _specialist_count(self, model) -> int:
        if self.cfg.n_specialists is not None:
            return self.cfg.n_specialists
        if self.cfg.budget_mb is None:
            return 1
        tokens = self.cfg.train.batch_size * self.cfg.train.context
        return specialists_for_budget(model_shape(model), self.cfg.budget_mb, tokens, self.cfg.rank,
                                      precision=self.cfg.train.precision).n_specialists

    def _credentials(self) -> dict:
        path = self.state_dir / CREDENTIALS
        if path.is_file():
            return json.loads(path.read_text())
        if not self.cfg.enroll_secret:
            raise ConfigError(f"this device is not enrolled yet ({path} is missing); pass the admin's enroll secret")
        client = AggregatorClient(self.cfg.server, retry=self.cfg.retry)
        try:
            answer = client.enroll(self.cfg.enroll_secret, self.cfg.name or socket.gethostname(),
                                   {"n_specialists": self.adapter.n_specialists,
                                    "n_generalists": self.adapter.n_generalists, "rank": self.adapter.rank,
                                    "base_model": self.base_name, "strategy": self.cfg.strategy,
                                    "alpha": self.adapter.alpha})
        finally:
            client.close()
        credentials = {"device_id": answer["device_id"], "token": answer["token"], "server": self.cfg.server}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        log.info("enrolled as device %d", credentials["device_id"])
        return credentials

    @property
    def device_id(self) -> int:
        return int(self._credentials()["device_id"])

    # shared tensors ----------------------------------------------------------------------------------------------
    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """What leaves the device: the strategy's shared roles (CoMiGS: attention LoRA and generalists)."""
        return self.strategy.shared_tensors(self.model)

    def own_upload(self) -> Upload:
        """This device's shared tensors with its rank, LoRA alpha and tensor roles (what a strategy's receive step
        reads)."""
        return device_upload(0, self.model, self.shared_tensors())

    def peer_loss(self, tensors: dict[str, torch.Tensor]) -> float:
        """Validation loss with ``tensors`` loaded in place of this device's shared tensors (PCL's peer score)."""
        return loss_with(self.model, tensors, self.data.valid, self.train_cfg.context,
                         max(8, self.train_cfg.batch_size), self.train_cfg.precision,
                         max_tokens=self.cfg.peer_eval_tokens)

    def load_global(self, tensors: dict[str, torch.Tensor], version: int | None = None) -> None:
        """Load a downloaded global version: version 0 (the federation's initial tensors, largest shapes) cut to
        this device's shapes; later versions through the strategy's receive step (the mean as is; a cut to this
        device's rank; PCL's trust-weighted mix of its peers)."""
        if version == 0:
            expected = self.strategy.initial_tensors(self.model)
            mine = tensors
            if self.strategy.rank_per_device:  # cut to this device's rank; names are checked below
                mine = {name: fit(t, expected[name].shape) if name in expected else t for name, t in tensors.items()}
        else:
            mine = self.strategy.receive(tensors, self.own_upload(), self.peer_loss)
            expected = self.strategy.shared_tensors(self.model)
        params = role_parameters(self.model, self.strategy.shared_roles)
        assign_tensors({name: params[name] for name in expected}, mine, "the global shared tensors")

    def sync(self, version: int) -> None:
        """Load global version ``version`` unless it is already loaded."""
        if self.global_version != version:
            self.load_global(self.client.download_global(version), version)
            self.global_version = version

    def _wait_for_new_round(self) -> dict:
        delay = self.cfg.poll_s
        while True:
            current = self.client.current_round()
            if current["round"] > self.last_round and not current["you_reported"]:
                return current
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)

    def checkpoint(self) -> None:
        save_checkpoint(self.state_dir / "checkpoints", self.model, self.state, self.base_name,
                        {"round": self.last_round, "completed_rounds": self.completed_rounds,
                         "global_version": self.global_version, "adapter": self.adapter.to_dict(),
                         "strategy_state": self.strategy.state})

    # one round of Algorithm 1 ---------------------------------------------------------------------------------------
    def run_round(self, progress: bool = False) -> RoundReport:
        """Fetch the global shared tensors, train locally (bi-level), upload the shared tensors, checkpoint."""
        current = self._wait_for_new_round()
        number = current["round"]
        self.sync(current["base_version"])
        log.info("round %d: training on global version %d", number, current["base_version"])
        start = time.perf_counter()
        self.strategy.begin_round(0, self.model)
        result, self.state = train_local(self.model, self.data, self.train_cfg, self.state, progress=progress,
                                         regularizer=self.strategy.regularizer(0))
        self.strategy.end_round(0, self.model)
        train_loss = sum(r["lm"] for r in result.train) / max(1, len(result.train))
        v_loss = result.valid[-1]["loss"] if result.valid else valid_loss(self.model, self.data.valid, self.train_cfg)
        metrics = {"train_loss": train_loss, "valid_loss": v_loss}
        accepted, reason = True, ""
        try:
            self.client.upload(number, self.shared_tensors(), result.tokens, metrics)
        except ServerRejected as err:
            if err.code != "round_closed":
                raise
            accepted, reason = False, err.detail
            log.warning("round %d closed before this device reported: %s", number, err.detail)
        self.last_round = number
        self.completed_rounds += 1
        self.checkpoint()
        return RoundReport(number, accepted, result.tokens, train_loss, v_loss, None,
                           time.perf_counter() - start, reason)

    def final_sync(self) -> int:
        """Wait for the round this device last reported to close and load the resulting global version."""
        delay = self.cfg.poll_s
        while True:
            current = self.client.current_round()
            if current["round"] > self.last_round:
                self.sync(current["base_version"])
                self.checkpoint()
                return current["base_version"]
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)

    def test_perplexity(self) -> float:
        tokens = None if self.cfg.eval_tokens in (None, 0) else self.cfg.eval_tokens
        return evaluate(self.model, self.data.test, self.train_cfg.context, max(8, self.train_cfg.batch_size),
                        self.train_cfg.precision, max_tokens=tokens).perplexity

    def run(self, progress: bool = False) -> list[RoundReport]:
        """Take part until ``cfg.rounds`` rounds are done (counting rounds done before a restart), then sync."""
        return list(self.rounds(progress))

    def rounds(self, progress: bool = False) -> Iterator[RoundReport]:
        """Like :meth:`run`, yielding each round's report as soon as the round is done."""
        while self.completed_rounds < self.cfg.rounds:
            report = self.run_round(progress)
            if self.cfg.eval_tokens != 0:
                report.test_perplexity = self.test_perplexity()
            log.info("round %d: %s, train loss %.3f, valid loss %.3f%s", report.round,
                     "uploaded" if report.accepted else "late", report.train_loss, report.valid_loss,
                     "" if report.test_perplexity is None else f", test ppl {report.test_perplexity:.2f}")
            yield report
        self.final_sync()


def initial_shared_tensors(model_name: str, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                           cache_dir: Path | None = None, strategy: str = DEFAULT_NETWORKED,
                           max_experts: int = 4) -> dict[str, torch.Tensor]:
    """Global version 0 for a federation: the strategy's freshly initialised shared tensors (CoMiGS: attention LoRA
    and generalists; B = 0; FFA-LoRA: also the A matrices every device keeps fixed). Strategies with a rank per
    device (hetlora-*, flexlora-*) get the rank of a device with ``max_experts`` experts, the largest the
    federation then admits; each device keeps the first components of its own rank."""
    chosen = networked_strategy(strategy)
    chosen.rank = rank
    base = load_base_model(model_name, cache_dir=cache_dir or default_cache_dir())
    torch.manual_seed(seed)
    adapter = replace(chosen.adapter_config(0, max(2, max_experts)), alpha=alpha)
    model = inject_adapters(base.model, adapter)
    chosen.prepare(0, model)
    return chosen.initial_tensors(model)


__all__ = ["Device", "DeviceConfig", "RoundReport", "initial_shared_tensors"]
