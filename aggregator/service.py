"""The federation's rules: enrollment, upload validation, round closing and aggregation. No HTTP here.

Aggregation runs the federation strategy's server rule (``device_sdk.strategies``, the code the simulation runs):
the plain mean streams one stored upload at a time; the other rules (HetLoRA, FlexLoRA, PCL's relay) read one
round's uploads into memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from safetensors import safe_open

from device_sdk.errors import ConfigError
from device_sdk.strategies import Strategy, Upload, networked_strategy

from . import aggregate
from .blobs import parse_safetensors, sha256, to_bytes
from .errors import Conflict, InvalidUpdate, NotFound, NotReady, RoundClosed, Unauthorized
from .schemas import Capabilities, FederationConfig
from .store import Device, Round, Store, new_token

log = logging.getLogger(__name__)


class Federation:
    """Operations on one federation's :class:`Store`; safe to call from several threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._aggregate_lock = threading.Lock()

    # admin ------------------------------------------------------------------------------------------------------
    def config(self) -> FederationConfig | None:
        fed = self.store.federation()
        return None if fed is None else FederationConfig(**fed[0])

    def spec(self) -> dict[str, aggregate.TensorSpec]:
        """Names, shapes and dtypes of global version 0 (the largest shapes, for per-device ranks)."""
        fed = self.store.federation()
        if fed is None or fed[1] is None:
            raise NotReady("the federation has no initial global tensors yet; the admin must upload them")
        return {k: aggregate.TensorSpec.from_json(v) for k, v in fed[1].items()}

    def strategy(self) -> Strategy:
        config = self.config()
        if config is None:
            raise NotReady("no federation has been created yet")
        return networked_strategy(config.strategy)

    def upload_spec(self, rank: int) -> dict[str, aggregate.TensorSpec]:
        """What a device of LoRA rank ``rank`` uploads: the tensors that travel, cut to its rank where ranks
        differ between devices."""
        spec, strategy = self.spec(), self.strategy()
        shapes = strategy.device_shapes({k: s.shape for k, s in spec.items() if strategy.travels(k)}, rank)
        return {k: aggregate.TensorSpec(tuple(shape), spec[k].dtype) for k, shape in shapes.items()}

    def create(self, config: FederationConfig, enroll_secret: str | None) -> str:
        if self.store.federation() is not None:
            raise Conflict("a federation already exists in this data directory; use another --data-dir")
        try:
            strategy = networked_strategy(config.strategy)
        except ConfigError as err:
            raise InvalidUpdate(str(err)) from err
        if config.aggregation != "mean" and not strategy.server_mean:
            raise InvalidUpdate(f"aggregation {config.aggregation!r} applies to mean-rule strategies; "
                                f"{config.strategy} weighs uploads by its own rule: leave aggregation at 'mean'")
        secret = enroll_secret or new_token(16)
        self.store.create_federation(config.model_dump(), secret)
        return secret

    def set_initial(self, payload: bytes) -> dict:
        """Global version 0 from the admin: it fixes the shared tensors' names, shapes and dtypes."""
        config = self.config()
        if config is None:
            raise NotReady("create the federation first (POST /admin/federation)")
        if self.store.latest_global_version() is not None:
            raise Conflict("the initial global tensors are already set")
        tensors, _ = parse_safetensors(payload)
        if not tensors:
            raise InvalidUpdate("the initial global tensors are empty")
        spec = aggregate.spec_of(tensors)
        aggregate.validate(tensors, spec)  # finite values
        self.store.set_initial_global(payload, {k: v.to_json() for k, v in spec.items()}, config.round_deadline_s)
        log.info("federation ready: %d shared tensors, round 1 open", len(spec))
        return {"tensors": len(spec), "round": 1}

    # devices ----------------------------------------------------------------------------------------------------
    def enroll(self, secret: str, name: str, capabilities: Capabilities) -> tuple[int, str]:
        config = self.config()
        if config is None:
            raise NotReady("no federation has been created yet")
        if not self.store.check_enroll_secret(secret):
            raise Unauthorized("wrong enrollment secret; ask the federation's admin for it")
        self._check_rank(capabilities.rank, config)
        for field in ("base_model", "strategy", "alpha"):  # refused before enrolling: it never blocks a round
            declared, expected = getattr(capabilities, field), getattr(config, field)
            if declared is not None and declared != expected:
                raise InvalidUpdate(f"the federation runs {field} {expected!r}, this device {declared!r}; join with "
                                    f"the federation's {field}")
        if capabilities.n_generalists < 1 and "generalist" in config.shared_roles:
            raise InvalidUpdate("a device needs at least one generalist to take part in the federation")
        return self.store.add_device(name, capabilities.model_dump())

    def _check_rank(self, rank: int, config: FederationConfig) -> None:
        if not self.strategy().rank_per_device:
            if rank != config.rank:
                raise InvalidUpdate(f"device rank {rank} does not match the federation's rank {config.rank}")
            return
        if rank % config.rank:
            raise InvalidUpdate(f"device rank {rank} is not a multiple of the federation's expert rank {config.rank}")
        fed = self.store.federation()
        if fed is not None and fed[1] is not None:
            largest = max((s.shape[0] for k, s in self.spec().items() if k.endswith("lora_A")), default=rank)
            if rank > largest:
                raise InvalidUpdate(f"device rank {rank} exceeds the federation's largest rank {largest} (its global "
                                    "tensors); the admin must create the federation with more experts "
                                    "(init-federation --max-experts)")

    def authenticate(self, token: str | None) -> Device:
        if not token:
            raise Unauthorized("missing bearer token; enroll first (POST /enroll) and send "
                               "'Authorization: Bearer <token>'")
        device = self.store.device_for_token(token)
        if device is None:
            raise Unauthorized("unknown device token")
        return device

    # rounds -----------------------------------------------------------------------------------------------------
    def current(self) -> Round:
        self.spec()
        current = self.store.current_round()
        assert current is not None  # set_initial opens round 1
        return current

    def expected_devices(self) -> int:
        return len(self.store.devices())

    def upload(self, device: Device, number: int, payload: bytes) -> tuple[bool, int]:
        """Validate and store one device's shared tensors for round ``number``.

        Returns:
            ``(duplicate, reports_in_round)``.

        Raises:
            NotFound: the round does not exist yet. RoundClosed: the round is over (the answer names the current
            round). Conflict: this device already uploaded different bytes for the round. InvalidUpdate: the
            payload does not match the federation.
        """
        current = self.current()
        target = self.store.round(number)
        if target is None:
            raise NotFound(f"round {number} does not exist; the current round is {current.round}",
                           current_round=current.round)
        existing = self.store.update(number, device.id)
        if existing is not None:
            if existing.sha256 == sha256(payload):
                return True, self.store.count_updates(number)
            raise Conflict(f"device {device.id} already uploaded different tensors for round {number}",
                           current_round=current.round)
        if target.status != "open":
            raise RoundClosed(f"round {number} is closed; join round {current.round}", current_round=current.round)
        tensors, metadata = parse_safetensors(payload)
        aggregate.validate(tensors, self.upload_spec(int(device.capabilities["rank"])))
        tokens, metrics = _update_metadata(metadata)
        if not self.store.add_update(number, device.id, payload, tokens, metrics):
            raise RoundClosed(f"round {number} closed while uploading; join round {number + 1}",
                              current_round=number + 1)
        return False, self.store.count_updates(number)

    def maybe_close(self, now: float | None = None) -> int | None:
        """Close the current round if its policy says so; returns the closed round number."""
        config = self.config()
        current = self.store.current_round()
        if config is None or current is None or current.status != "open":
            return None
        reported = self.store.count_updates(current.round)
        everyone = reported >= max(self.expected_devices(), config.min_devices)
        late = (now or time.time()) >= current.deadline and reported >= config.min_devices
        if not (everyone or late):
            return None
        if not self.store.mark_aggregating(current.round):
            return None
        self.aggregate(current.round)
        return current.round

    def aggregate(self, number: int) -> None:
        """Aggregate the stored updates of a round in ``aggregating`` state and open the next round.

        The mean streams the updates one file at a time; other rules read the round's uploads into memory. Redone
        from scratch after a crash.
        """
        with self._aggregate_lock:
            start = time.perf_counter()
            current = self.store.round(number)
            if current is None or current.status != "aggregating":
                return
            config = self.config()
            strategy = self.strategy()
            updates = self.store.updates(number)
            if strategy.server_mean:
                result = self._streaming_mean(config, updates)
            else:
                result = strategy.server_rule(self._uploads(config, updates))
            summary = {"participants": [u.device_id for u in updates], "tokens": sum(u.tokens for u in updates),
                       "mean_metrics": _mean_metrics([u.metrics for u in updates]),
                       "rule": config.aggregation if strategy.server_mean else strategy.name,
                       "aggregation_s": time.perf_counter() - start}
            self.store.close_round(number, to_bytes(result, {"round": str(number)}), summary, config.round_deadline_s)
            log.info("round %d closed with %d update(s); global version %d", number, len(updates), number)

    def _streaming_mean(self, config: FederationConfig, updates: list) -> dict:
        """The (weighted) mean, reading one stored upload at a time."""
        mean = aggregate.RunningMean(self.upload_spec(config.rank))
        for update in updates:
            with safe_open(str(update.path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            mean.add(tensors, aggregate.weight_for(config.aggregation, update.tokens), check_values=False)
            del tensors
        return mean.result()

    def _uploads(self, config: FederationConfig, updates: list) -> list[Upload]:
        """Every stored upload of a round in memory, with the device's rank and the federation's LoRA alpha
        (per-device rules read each module's scale from its factors' rank)."""
        devices = {d.id: d for d in self.store.devices()}
        uploads = []
        for position, update in enumerate(updates):
            with safe_open(str(update.path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            rank = int(devices[update.device_id].capabilities["rank"])
            uploads.append(Upload(position, tensors, update.tokens, rank, config.alpha))
        return uploads

    def recover(self) -> None:
        """Redo aggregations a crash interrupted."""
        for r in self.store.rounds("aggregating"):
            log.warning("redoing the interrupted aggregation of round %d", r.round)
            self.aggregate(r.round)


def _update_metadata(metadata: dict[str, str]) -> tuple[int, dict]:
    try:
        tokens = int(metadata.get("tokens", "0"))
        metrics = json.loads(metadata.get("metrics", "{}"))
    except ValueError as err:
        raise InvalidUpdate(f"update metadata 'tokens' must be an integer and 'metrics' JSON: {err}") from err
    if tokens < 0 or not isinstance(metrics, dict):
        raise InvalidUpdate("update metadata: 'tokens' must be >= 0 and 'metrics' a JSON object")
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            clean[str(k)] = float(v)
    return tokens, clean


def _mean_metrics(all_metrics: list[dict]) -> dict[str, float]:
    keys = sorted({k for m in all_metrics for k in m})
    return {k: sum(m[k] for m in all_metrics if k in m) / sum(1 for m in all_metrics if k in m) for k in keys}
