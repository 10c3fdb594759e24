"""Configuration of a simulated federation (``python -m device_sdk simulate``) and its presets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data import UserData
from ..errors import ConfigError
from ..precision import PRECISIONS, resolve_precision
from ..strategies import ALL, CORE

#: Settings of each preset; command-line flags given explicitly override them.
PRESETS: dict[str, dict] = {
    # The six core strategies on one split in about an hour on a 2-core CPU with SmolLM2 (see docs/results.md).
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
        via_server: aggregate through a real aggregator process on loopback (plain-mean strategies; the others
            run in-process). Results are identical, so runs share the cache.
        train_tokens: ``((user, n), ...)``: these users train on the first ``n`` tokens of their training stream
            only (low-data users, as in the paper's section 4.3.2); empty: every user keeps all of its data.
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
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        else:  # the cache key holds what the runs really use, never "auto"
            object.__setattr__(self, "precision", resolve_precision(self.precision))
        if not self.seeds:
            problems.append("no seeds given")
        capped = [user for user, _ in self.train_tokens]
        if len(set(capped)) != len(capped):
            problems.append(f"train_tokens names a user twice: {capped}")
        small = [f"{user}={n}" for user, n in self.train_tokens if n < self.ctx + 1]
        if small:
            problems.append(f"train_tokens {small} leave less than one training window of ctx+1 = {self.ctx + 1} "
                            "tokens; give more tokens or lower ctx")
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

    def run_key(self, strategy: str, seed: int, users: list[str]) -> str:
        """Cache key of one (strategy, seed) run: every setting that changes its numbers."""
        ignored = {"strategies", "seeds", "cache_dir", "extra", "via_server", "routing_layers"}
        if not self.train_tokens:  # keys of runs on full data stay as they were before the setting existed
            ignored.add("train_tokens")
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        relevant.update(data=str(Path(self.data).resolve()), users=users, strategy=strategy, seed=seed)
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{strategy}-seed{seed}-{digest}"


def cap_training(users: list[UserData], train_tokens: tuple[tuple[str, int], ...]) -> list[UserData]:
    """``users`` with the named users' training streams cut to their first ``n`` tokens (validation and test
    untouched; the caller's arrays are not modified).

    Raises:
        ConfigError: if a named user is not among ``users``.
    """
    caps = dict(train_tokens)
    unknown = sorted(set(caps) - {u.name for u in users})
    if unknown:
        raise ConfigError(f"--train-tokens names users {unknown} that are not in the data; the users are "
                          f"{sorted(u.name for u in users)}")
    return [replace(u, train=u.train[: caps[u.name]]) if u.name in caps else u for u in users]


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


__all__ = ["PRESETS", "SimConfig", "cap_training", "replace", "with_preset"]
