"""Configuration of a simulated federation (``python -m device_sdk simulate``) and its presets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LB_MODES, MIXINGS, REFERENCE_OPTIMIZER, SCHEDULES, TrainConfig
from ..device_select import resolve_placement
from ..errors import ConfigError
from ..federated.catalog import ALL, CORE

if TYPE_CHECKING:
    from ..data import UserData

#: How a simulation runs its devices: ``local`` (one process, one device after the other) or ``flower`` (Flower's
#: simulation engine: one virtual device per Flower node, run by Ray workers in parallel).
ENGINES = ("local", "flower")

#: Settings of each preset; command-line flags given explicitly override them. Every preset trains with the
#: optimizer of the authors' code (:data:`device_sdk.config.REFERENCE_OPTIMIZER`).
PRESETS: dict[str, dict] = {
    # The paper's data regime at our compute (docs/results.md): 5 rounds x 10 steps of 8 x 128 tokens see 51,200
    # tokens per user, about 3 epochs of a fixed 16,384-token training prefix (the paper: 2-4 epochs); an
    # 8,192-token validation prefix (half the training size; the paper's validation sets are 6-55% of it); test
    # perplexity on 16,384 tokens per user in windows spread over the whole test set. The default of the table.
    "scaled": {"strategies": CORE, "rounds": 5, "local_steps": 10, "batch": 8, "ctx": 128, "router_period": 10,
               "router_steps": 3, "eval_tokens": 16384, "train_prefix": 16384, "valid_prefix": 8192},
    # The same compute on all of each user's data (about 5% of an epoch: nobody overfits).
    "quick": {"strategies": CORE, "rounds": 5, "local_steps": 10, "batch": 8, "ctx": 128, "router_period": 10,
              "router_steps": 3, "eval_tokens": 8192},
    # The paper's settings (section 4.1.2, appendix B): 20 rounds x 10 steps, batch 64 x 128, tau = 30, s = 10.
    "paper": {"strategies": ALL, "rounds": 20, "local_steps": 10, "batch": 64, "ctx": 128, "router_period": 30,
              "router_steps": 10, "eval_tokens": None},
    # A few minutes: the README's main job.
    "demo": {"strategies": ("local", "fedavg", "comigs-1g1s"), "rounds": 2, "local_steps": 5, "batch": 4,
             "ctx": 128, "router_period": 5, "router_steps": 2, "eval_tokens": 4096},
}


@dataclass(frozen=True)
class SimConfig:
    """One simulated comparison: every strategy x seed on the same users and settings.

    Attributes:
        data: a split folder with one folder per user (``<data>/<user>/train.txt[.gz]`` ...).
        strategies: strategy names (see :mod:`device_sdk.strategies`).
        experts: LoRA modules per MLP projection for each user (1GXS specialists, HetLoRA/FlexLoRA ranks); one
            value applies to every user.
        rounds, local_steps: communication rounds, expert steps between them.
        router_period, router_steps: tau and s.
        ood: validation and test become the uniform mixture of all users' (out-of-distribution setting).
        eval_tokens: test tokens per user per evaluation (``None``: the whole test set).
        peer_eval_tokens: validation tokens per model evaluation for PCL's trust and for expert scores.
        via_server: aggregate through a real aggregator process on loopback (every collaborative
            strategy). Results are identical, so runs share the cache.
        train_tokens: ``((user, n), ...)``: these users train on the first ``n`` tokens of their training stream
            only (low-data users, as in the paper's section 4.3.2); empty: every user keeps all of its data.
        train_prefix, valid_prefix: every user keeps only the first this many tokens of its training / validation
            stream (``None``: all); ``train_tokens`` caps further.
        mixing: how experts mix (:data:`device_sdk.config.MIXINGS`).
        lb_mode: load balancing (:data:`device_sdk.config.LB_MODES`); ``None``: each strategy's own (switch; the
            generalist-favoured ``importance`` of eq. 5 for CoMiGS-1GXS, as in the paper's Table 2).
        betas, weight_decay, schedule, final_lr_fraction, grad_clip: the optimizer (see
            :class:`device_sdk.config.TrainConfig`); defaults are the authors' code's.
        device: where every user's model trains and evaluates: ``auto`` (the default: ``cuda`` when
            ``torch.cuda.is_available()``, else ``cpu``), ``cpu``, ``cuda`` or ``cuda:N``; resolved when the config
            is built (``precision="auto"`` then resolves for that device). Part of the cache key unless ``cpu``.
        compile: every user's training steps run their decoder blocks through ``torch.compile``
            (:attr:`device_sdk.config.TrainConfig.compile`). Part of the cache key when set (the numbers differ from
            eager ones by float rounding).
        engine: :data:`ENGINES`; ``flower`` runs the collaborative strategies on Flower's simulation engine (the same
            numbers as ``local``, see :mod:`device_sdk.flower`), the others in-process. Not part of the cache key.
        client_cpus: with ``engine="flower"``, CPU cores (torch threads) each virtual device gets.
        flower_cpus: with ``engine="flower"``, CPU cores Ray may use in all (``None``: every core); virtual devices
            run ``flower_cpus // client_cpus`` at a time.
    """

    data: Path
    strategies: tuple[str, ...] = CORE
    experts: tuple[int, ...] = (2,)
    rounds: int = 5
    local_steps: int = 10
    batch: int = 8
    ctx: int = 128
    router_period: int = 10
    router_steps: int = 3
    lr: float = 2e-3
    router_lr: float = 2e-3
    lb_weight: float = 0.01
    precision: str = "auto"
    ood: bool = False
    seeds: tuple[int, ...] = (1,)
    model: str = "smollm2-135m"
    users: tuple[str, ...] | None = None
    eval_tokens: int | None = 8192
    peer_eval_tokens: int = 4096
    via_server: bool = False
    routing_layers: tuple[int, ...] | None = None
    train_tokens: tuple[tuple[str, int], ...] = ()
    train_prefix: int | None = None
    valid_prefix: int | None = None
    mixing: str = "mlp"
    lb_mode: str | None = None
    betas: tuple[float, float] = REFERENCE_OPTIMIZER["betas"]
    weight_decay: float = REFERENCE_OPTIMIZER["weight_decay"]
    schedule: str = REFERENCE_OPTIMIZER["schedule"]
    final_lr_fraction: float = REFERENCE_OPTIMIZER["final_lr_fraction"]
    grad_clip: float = REFERENCE_OPTIMIZER["grad_clip"]
    device: str = "auto"
    compile: bool = False
    engine: str = "local"
    client_cpus: int = 1
    flower_cpus: int | None = None
    cache_dir: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        unknown = [s for s in self.strategies if s not in ALL]
        if unknown:
            problems.append(f"unknown strategies {unknown}; choose from {', '.join(ALL)}")
        if not self.strategies:
            problems.append("no strategies given")
        if not self.experts or any(not isinstance(e, int) or e < 1 for e in self.experts):
            problems.append(f"experts must be positive integers, got {self.experts}")
        for name in ("rounds", "local_steps", "batch", "ctx", "router_period", "peer_eval_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.router_steps < 0:
            problems.append(f"router_steps must be >= 0, got {self.router_steps}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            problems.append(f"eval_tokens must be >= 1 or None, got {self.eval_tokens}")
        if not isinstance(self.compile, bool):
            problems.append(f"compile must be True or False, got {self.compile!r}")
        device, precision, placement = resolve_placement(self.device, self.precision)  # the cache key holds what
        object.__setattr__(self, "device", device)  # the runs really use, never "auto"
        object.__setattr__(self, "precision", precision)
        problems.extend(placement)
        if not self.seeds:
            problems.append("no seeds given")
        capped = [user for user, _ in self.train_tokens]
        if len(set(capped)) != len(capped):
            problems.append(f"train_tokens names a user twice: {capped}")
        small = [f"{user}={n}" for user, n in self.train_tokens if n < self.ctx + 1]
        if small:
            problems.append(f"train_tokens {small} leave less than one training window of ctx+1 = {self.ctx + 1} "
                            "tokens; give more tokens or lower ctx")
        for name in ("train_prefix", "valid_prefix"):
            value = getattr(self, name)
            if value is not None and value < self.ctx + 1:
                problems.append(f"{name} must leave at least one window of ctx+1 = {self.ctx + 1} tokens, got {value}")
        if self.mixing not in MIXINGS:
            problems.append(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.lb_mode is not None and self.lb_mode not in LB_MODES:
            problems.append(f"lb_mode must be one of {LB_MODES}, got {self.lb_mode!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES}, got {self.engine!r}")
        elif self.engine == "flower" and self.via_server:
            problems.append("engine 'flower' aggregates on Flower's ServerApp; --via-server is for the local engine")
        if self.client_cpus < 1:
            problems.append(f"client_cpus must be >= 1, got {self.client_cpus}")
        if self.flower_cpus is not None and self.flower_cpus < self.client_cpus:
            problems.append(f"flower_cpus ({self.flower_cpus}) must be >= client_cpus ({self.client_cpus})")
        if problems:
            raise ConfigError("invalid simulation settings: " + "; ".join(problems))

    def experts_for(self, n_users: int) -> tuple[int, ...]:
        """Experts per user, one value broadcast to all.

        Raises:
            ConfigError: if the count of values is neither 1 nor the number of users.
        """
        if len(self.experts) == 1:
            return self.experts * n_users
        if len(self.experts) != n_users:
            raise ConfigError(f"--experts has {len(self.experts)} values for {n_users} users; give one value or "
                              "one per user (in the users' alphabetical order)")
        return self.experts

    def train_config(self, strategy, member: int, seed: int, batch: int | None = None) -> TrainConfig:
        """The local training settings of federation member ``member`` (its index) in the run of ``seed``: one
        schedule over all rounds, batches sampled with ``seed * 1000 + member``, the strategy's router mode and load
        balancing (``--lb-mode`` overrides the latter). ``batch`` defaults to ``self.batch`` (a centralized run's
        one member takes the pooled batch). The end-of-round validation loss is not reported (``eval_batches=1``).

        Args:
            strategy: a :class:`device_sdk.strategies.Strategy` (its ``train_overrides()``).
        """
        overrides = strategy.train_overrides()
        if self.lb_mode is not None:
            overrides["lb_mode"] = self.lb_mode
        base = TrainConfig(steps=self.local_steps, batch_size=self.batch if batch is None else batch,
                           context=self.ctx, lr_experts=self.lr, lr_router=self.router_lr, betas=self.betas,
                           weight_decay=self.weight_decay, schedule=self.schedule,
                           final_lr_fraction=self.final_lr_fraction, grad_clip=self.grad_clip,
                           lb_weight=self.lb_weight, router_period=self.router_period,
                           router_steps=self.router_steps, schedule_steps=self.rounds * self.local_steps,
                           precision=self.precision, device=self.device, seed=seed * 1000 + member,
                           log_every=self.local_steps, eval_batches=1, compile=self.compile)
        return replace(base, **overrides)

    def run_key(self, strategy: str, seed: int, users: list[str]) -> str:
        """Cache key of one (strategy, seed) run: every setting that changes its numbers."""
        ignored = {"strategies", "seeds", "cache_dir", "extra", "via_server", "routing_layers", "engine",
                   "client_cpus", "flower_cpus"}
        if self.lb_mode is None:  # the strategy's own load balancing is part of the strategy
            ignored.add("lb_mode")
        if not self.train_tokens:  # keys of runs on full data stay as they were before the setting existed
            ignored.add("train_tokens")
        if self.device == "cpu":  # keys of CPU runs stay as they were before the setting existed
            ignored.add("device")
        if not self.compile:  # keys of eager runs stay as they were before the setting existed
            ignored.add("compile")
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        if "device" in relevant:  # GPU kernels change the numbers; which GPU index ran them does not
            relevant["device"] = self.device.partition(":")[0]
        relevant.update(data=str(Path(self.data).resolve()), users=users, strategy=strategy, seed=seed)
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{strategy}-seed{seed}-{digest}"


def cap_training(users: list[UserData], train_tokens: tuple[tuple[str, int], ...], train_prefix: int | None = None,
                 valid_prefix: int | None = None) -> list[UserData]:
    """``users`` with every training stream cut to its first ``train_prefix`` tokens, every validation stream to
    its first ``valid_prefix`` (``None``: uncut), and the users named in ``train_tokens`` trained on their first
    ``n`` tokens (test untouched; the caller's arrays are not modified).

    Raises:
        ConfigError: if a named user is not among ``users``.
    """
    caps = dict(train_tokens)
    unknown = sorted(set(caps) - {u.name for u in users})
    if unknown:
        raise ConfigError(f"--train-tokens names users {unknown} that are not in the data; the users are "
                          f"{sorted(u.name for u in users)}")
    out = []
    for u in users:
        train_cap = min(c for c in (caps.get(u.name), train_prefix, len(u.train)) if c is not None)
        out.append(replace(u, train=u.train[:train_cap], valid=u.valid[:valid_prefix]))
    return out


def with_preset(name: str | None, **explicit) -> SimConfig:
    """A :class:`SimConfig` from a preset, overridden by the explicitly given (non-``None``) settings.

    Raises:
        ConfigError: for an unknown preset.
    """
    if name is not None and name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    settings = dict(PRESETS.get(name, {}))
    settings.update({k: v for k, v in explicit.items() if v is not None})
    if "eval_tokens" in settings and settings["eval_tokens"] == 0:
        settings["eval_tokens"] = None
    return SimConfig(**settings)


__all__ = ["ENGINES", "PRESETS", "SimConfig", "cap_training", "replace", "with_preset"]
