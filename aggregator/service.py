"""The federation's rules: enrollment, upload validation, round closing and aggregation. No HTTP here.

Aggregation runs the server rule the strategy's name picks (:mod:`device_sdk.federated`, what the simulation runs).
The plain-mean rules (``mean``, ``token_weighted``) keep a running float64 sum of the open round's accepted uploads,
so closing a round is one division and one write; it is rebuilt from the stored uploads after a restart. The other
rules (HetLoRA, FlexLoRA, PCL's relay) read one round's uploads into memory when the round closes.

An upload is checked for everything its round's rule will need (names, shapes per device rank, finite values within
the federation's ``max_abs_value``, a positive token count where the rule weighs by tokens: ``token_weighted``,
FlexLoRA; sane metadata numbers) before it is stored. What still fails when a round closes (a non-finite global, a
disk error) leaves the round ``failed`` with its reason, visible in ``/status``; the server keeps serving and the
admin retries or closes it.
"""

from __future__ import annotations

import logging
import threading
import time

from safetensors import safe_open

from device_sdk.errors import ConfigError
from device_sdk.federated import RULES, StrategySpec, Upload, networked_spec
from device_sdk.federated.rules import check_tokens

from . import aggregate
from .blobs import canonical_metadata, parse_safetensors, read_metadata, sha256, to_bytes
from .errors import (AggregationFailed, AggregatorError, Conflict, DeviceRetired, InvalidUpdate, NotFound, NotReady,
                     RoundClosed, Unauthorized)
from .schemas import Capabilities, FederationConfig
from .settings import check_secret
from .store import Added, Device, Round, Store, Update, new_token

log = logging.getLogger(__name__)


class Federation:
    """Operations on one federation's :class:`Store`; safe to call from several threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._aggregate_lock = threading.Lock()
        # Held while an upload is stored and counted, and while a round is marked aggregating: a round's running
        # mean then holds exactly the uploads its rows name when it closes.
        self._accept_lock = threading.Lock()
        self._mean: aggregate.RoundMean | None = None  # the open round's running mean (None: rebuilt on demand)
        # Held while the federation is created and its initial tensors are set: a check and the write it guards
        # are one step (one server per data directory, so a lock in this process orders every request).
        self._setup_lock = threading.Lock()

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

    def strategy(self) -> StrategySpec:
        """The server side of the federation's strategy (its rule, what travels, per-device ranks)."""
        config = self.config()
        if config is None:
            raise NotReady("no federation has been created yet")
        return networked_spec(config.strategy)

    def upload_spec(self, rank: int) -> dict[str, aggregate.TensorSpec]:
        """What a device of LoRA rank ``rank`` uploads: the tensors that travel, cut to its rank where ranks
        differ between devices."""
        spec, strategy = self.spec(), self.strategy()
        shapes = strategy.upload_shapes({k: s.shape for k, s in spec.items()}, rank)
        return {k: aggregate.TensorSpec(tuple(shape), spec[k].dtype) for k, shape in shapes.items()}

    def create(self, config: FederationConfig, enroll_secret: str | None) -> str:
        """Create the federation; returns the enrollment secret (generated when ``enroll_secret`` is None).

        The same request again (the same configuration and enrollment secret: a client retrying after a lost
        answer) answers as the first did.

        Raises:
            Conflict: a federation exists (another one, or one whose secret the server generated). InvalidUpdate: a
            strategy a server cannot run, an aggregation rule the strategy does not use, or an enrollment secret
            shorter than 22 characters.
        """
        with self._setup_lock:
            existing = self.config()
            if existing is not None:
                if (enroll_secret is not None and existing == config
                        and self.store.check_enroll_secret(enroll_secret)):
                    return enroll_secret
                raise Conflict("a federation already exists in this data directory; use another --data-dir")
            return self._create(config, enroll_secret)

    def _create(self, config: FederationConfig, enroll_secret: str | None) -> str:
        if enroll_secret is not None:
            try:
                check_secret(enroll_secret, "enroll_secret")
            except ValueError as err:
                raise InvalidUpdate(str(err)) from err
        try:
            strategy = networked_spec(config.strategy)
        except ConfigError as err:
            raise InvalidUpdate(str(err)) from err
        if config.aggregation != "mean" and not strategy.plain_mean:
            raise InvalidUpdate(f"aggregation {config.aggregation!r} applies to mean-rule strategies; "
                                f"{config.strategy} weighs uploads by its own rule: leave aggregation at 'mean'")
        secret = enroll_secret or new_token(16)
        self.store.create_federation(config.model_dump(), secret)
        return secret

    def set_initial(self, payload: bytes) -> dict:
        """Global version 0 from the admin: it fixes the shared tensors' names, shapes and dtypes. The same
        payload again (a client retrying after a lost answer) answers as the first did; other tensors get 409."""
        config = self.config()
        if config is None:
            raise NotReady("create the federation first (POST /admin/federation)")
        with self._setup_lock:
            if self.store.latest_global_version() is not None:
                stored = self.store.global_blob(0)
                if stored is not None and stored[1] == sha256(payload):
                    return {"tensors": len(self.spec()), "round": 1}
                raise Conflict("the initial global tensors are already set (to other tensors)")
            tensors, _ = parse_safetensors(payload)
            if not tensors:
                raise InvalidUpdate("the initial global tensors are empty")
            spec = aggregate.spec_of(tensors)
            aggregate.validate(tensors, spec, config.max_abs_value)  # finite values within the federation's bound
            self.store.set_initial_global(payload, {k: v.to_json() for k, v in spec.items()}, config.round_deadline_s)
        log.info("federation ready: %d shared tensors, round 1 open", len(spec))
        return {"tensors": len(spec), "round": 1}

    # devices ----------------------------------------------------------------------------------------------------
    def enroll(self, secret: str, name: str, capabilities: Capabilities, token: str | None = None) -> tuple[int, str]:
        """Enroll a device; returns its id and bearer token (``token`` when the device chose one, else a new one).

        A device that chose its token can repeat the request (a retry after a lost answer, a restart mid-way):
        with the same name and capabilities it gets the same device, never a second one.

        Raises:
            NotReady: no federation yet. Unauthorized: a wrong enrollment secret. InvalidUpdate: capabilities the
            federation does not run. Conflict: ``token`` is enrolled already with another name or capabilities.
        """
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
        device, token, added = self.store.add_device(name, capabilities.model_dump(), token)
        if not added and device.retired_at is not None:
            raise DeviceRetired(f"this device token belonged to device {device.id} ({device.name!r}), which the admin "
                           "retired; enroll with a new token (a new state folder)")
        if not added and (device.name, device.capabilities) != (name, capabilities.model_dump()):
            raise Conflict(f"this device token is enrolled already, as device {device.id} ({device.name!r}) with "
                           "other settings; a device that joins with other settings enrolls with a new token (a new "
                           "state folder)")
        return device.id, token

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

    def retire(self, device_id: int) -> Device:
        """Retire a device: its token stops working and rounds stop waiting for it (a device whose state was lost
        and that enrolled again, a phone that left). Its uploads stay part of their rounds. Retiring a retired
        device changes nothing.

        Raises:
            NotFound: no such device.
        """
        device = self.store.retire_device(device_id)
        if device is None:
            raise NotFound(f"device {device_id} does not exist (see /status/devices)")
        log.warning("device %d (%s) retired by the admin", device.id, device.name)
        self.maybe_close()  # the current round may have every remaining device's upload now
        return device

    def authenticate(self, token: str | None) -> Device:
        if not token:
            raise Unauthorized("missing bearer token; enroll first (POST /enroll) and send "
                               "'Authorization: Bearer <token>'")
        device = self.store.device_for_token(token, retired=True)
        if device is None:
            raise Unauthorized("unknown device token")
        if device.retired_at is not None:
            raise Unauthorized(f"device {device.id} ({device.name!r}) was retired by the admin; enroll again with a "
                               "new state folder")
        return device

    # rounds -----------------------------------------------------------------------------------------------------
    def current(self) -> Round:
        self.spec()
        current = self.store.current_round()
        assert current is not None  # set_initial opens round 1
        return current

    def expected_devices(self) -> int:
        """The active (enrolled, not retired) devices: a round closes early once all of them reported."""
        return self.store.count_devices()

    def upload(self, device: Device, number: int, payload: bytes) -> tuple[bool, int]:
        """Validate and store one device's shared tensors for round ``number``.

        A replay (the same tensors and metadata values, however serialised) is answered as a duplicate; two requests
        of one device racing for one round store one upload.

        Returns:
            ``(duplicate, reports_in_round)``.

        Raises:
            NotFound: the round does not exist. RoundClosed: the round is over (the answer names the current round),
            or failed and waits for the admin. Conflict: this device already uploaded other tensors or metadata for
            the round. InvalidUpdate: the payload does not match the federation or carries out-of-range numbers.
        """
        current = self.current()
        target = self.store.round(number)
        if target is None:
            raise NotFound(f"round {number} does not exist; the current round is {current.round}",
                           current_round=current.round)
        tensors, metadata = parse_safetensors(payload)
        tokens, metrics = read_metadata(metadata)
        digest = aggregate.content_digest(tensors, canonical_metadata(metadata, tokens, metrics))
        existing = self.store.update(number, device.id)
        if existing is not None:  # a replay (the device lost our answer) or a conflict: no need to store anything
            reported = self.store.count_updates(number, active_only=True)
            return self._replayed(existing, digest, payload, number, current), reported
        if target.status != "open":
            raise self._not_open(target, current)
        config, strategy = self.config(), self.strategy()
        aggregate.validate(tensors, self.upload_spec(int(device.capabilities["rank"])), config.max_abs_value)
        weight = aggregate.weight_for(config.aggregation, tokens) if strategy.plain_mean else None
        if strategy.weighs_by_tokens:
            with aggregate.as_invalid_update():
                check_tokens(tokens, strategy.name)
        path = self.store.write_update_blob(number, device.id, digest, payload)  # in parallel, outside the lock
        with self._accept_lock:
            running = self._running_mean(number, config) if weight is not None else None  # never raises
            outcome, existing = self.store.insert_update(number, device.id, digest, path, tokens, metrics)
            if outcome is Added.ADDED and running is not None:
                try:
                    running.add(device.id, tensors, weight)
                except Exception:  # the round's close rebuilds the mean from the stored uploads
                    log.exception("round %d: the running mean lost device %d's upload; it is rebuilt on close",
                                  number, device.id)
                    self._mean = None
        if outcome is Added.NOT_OPEN:
            target = self.store.round(number) or target
            raise self._not_open(target, self.current())
        if outcome is not Added.ADDED:
            reported = self.store.count_updates(number, active_only=True)
            return self._replayed(existing, digest, payload, number, current), reported
        return False, self.store.count_updates(number, active_only=True)

    def _replayed(self, existing: Update, digest: str, payload: bytes, number: int, current: Round) -> bool:
        """True for a replay of ``existing``, else raise Conflict. Uploads stored before content digests were
        compared by their raw SHA-256."""
        if existing.sha256 == digest or existing.sha256 == sha256(payload):
            return True
        raise Conflict(f"device {existing.device_id} already uploaded different tensors or metadata for round "
                       f"{number}; a round takes one upload per device: wait for round {number + 1}",
                       current_round=current.round)

    @staticmethod
    def _not_open(target: Round, current: Round) -> RoundClosed:
        if target.status == "failed" and target.closed_at is None:
            return RoundClosed(f"round {target.round} failed to aggregate ({target.failure}); uploads wait until "
                               "the admin retries or closes it", current_round=current.round, round_status="failed")
        if target.status == "aggregating":
            return RoundClosed(f"round {target.round} is closing (its global is being computed); join round "
                               f"{target.round + 1} once it opens", current_round=current.round)
        return RoundClosed(f"round {target.round} is closed; join round {current.round}", current_round=current.round)

    def _running_mean(self, number: int, config: FederationConfig) -> aggregate.RoundMean | None:
        """The running mean of open round ``number`` (call with ``_accept_lock`` held), built from its stored
        uploads when there is none yet (first upload of the round, or after a restart); None if that fails."""
        if self._mean is not None and self._mean.round == number:
            return self._mean
        self._mean = None
        try:
            self._mean = self._rebuild_mean(number, config, self.store.updates(number))
        except Exception:
            log.exception("round %d: rebuilding the running mean from the stored uploads failed; the round's close "
                          "reads them again", number)
        return self._mean

    def _rebuild_mean(self, number: int, config: FederationConfig, updates: list[Update]) -> aggregate.RoundMean:
        """The round's mean, reading one stored upload at a time."""
        running = aggregate.RoundMean(number, self.upload_spec(config.rank))
        for update in updates:
            with safe_open(str(update.path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            running.add(update.device_id, tensors, aggregate.weight_for(config.aggregation, update.tokens))
            del tensors
        return running

    def maybe_close(self, now: float | None = None) -> int | None:
        """Close the current round if its policy says so; returns the closed round number (also when its
        aggregation failed: the round is then ``failed``)."""
        config = self.config()
        current = self.store.current_round()
        if config is None or current is None or current.status != "open":
            return None
        reported = self.store.count_updates(current.round)
        active = self.store.count_updates(current.round, active_only=True)  # a retired device's upload still counts
        everyone = active >= self.expected_devices() and reported >= config.min_devices  # in the round, not here
        late = (now or time.time()) >= current.deadline and reported >= config.min_devices
        if not (everyone or late):
            return None
        with self._accept_lock:  # no upload is between its row and the running mean
            if not self.store.mark_aggregating(current.round):
                return None
            running, self._mean = self._mean, None
        self.aggregate(current.round, running if running is not None and running.round == current.round else None)
        return current.round

    def aggregate(self, number: int, running: aggregate.RoundMean | None = None) -> None:
        """Aggregate the stored updates of a round in ``aggregating`` state and open the next round.

        Never raises: a failure (no publishable global, an I/O error) leaves the round ``failed`` with its reason,
        for the admin to retry or close (:meth:`retry`, :meth:`close_failed`).

        Args:
            running: the round's running mean (mean rules); used when it counts exactly the stored uploads, else the
                mean is rebuilt from them. Other rules read the round's uploads into memory.
        """
        with self._aggregate_lock:
            start = time.perf_counter()
            current = self.store.round(number)
            if current is None or current.status != "aggregating":
                return
            summary: dict = {}
            try:
                config = self.config()
                strategy = self.strategy()
                updates = self.store.updates(number)
                summary = {"participants": [u.device_id for u in updates], "tokens": sum(u.tokens for u in updates),
                           "mean_metrics": _mean_metrics([u.metrics for u in updates]),
                           "rule": config.aggregation if strategy.plain_mean else strategy.name}
                if not updates:
                    raise AggregationFailed(f"round {number} has no uploads to aggregate")
                if strategy.plain_mean:
                    reused = running is not None and running.members == {u.device_id for u in updates}
                    if not reused:
                        running = self._rebuild_mean(number, config, updates)
                    result = running.mean.result()
                    summary["running_mean"] = reused
                else:
                    result = RULES[strategy.rule](self._uploads(config, updates))
                aggregate.check_finite(result)
                payload = to_bytes(result, {"round": str(number)})
                summary["aggregation_s"] = time.perf_counter() - start
                self.store.close_round(number, payload, summary, config.round_deadline_s)
            except Exception as err:
                reason = err.message if isinstance(err, AggregatorError) else f"{type(err).__name__}: {err}"
                log.exception("round %d failed to aggregate: %s; retry or close it (POST /admin/rounds/%d/retry or "
                              "/close)", number, reason, number)
                try:
                    self.store.fail_round(number, reason, summary)
                except Exception:  # the round stays aggregating; the next start redoes it
                    log.exception("round %d: recording the failure failed", number)
                return
            log.info("round %d closed with %d update(s); global version %d", number, len(updates), number)

    def retry(self, number: int) -> Round:
        """Aggregate a failed round again, from its stored uploads (for a failure that has gone away: a full disk,
        a file the operator restored). The round ends ``closed`` with a new global version, or ``failed`` again
        with the new reason.

        Returns:
            The current round afterwards.

        Raises:
            NotFound: no such round. Conflict: the round is not failed, or the admin closed it already.
        """
        self._failed_round(number)
        if not self.store.retry_round(number):
            raise Conflict(f"round {number} is not a failed round awaiting the admin any more; see /status")
        log.warning("round %d: the admin retries its aggregation", number)
        self.aggregate(number)
        return self.current()

    def close_failed(self, number: int) -> Round:
        """Close a failed round without a new global version: its uploads are kept (visible in ``/status``) but not
        used, and the next round opens on the same global version the failed round started from, so every device
        trains on the last published global again.

        Returns:
            The new current round.

        Raises:
            NotFound: no such round. Conflict: the round is not the current failed round.
        """
        self._failed_round(number)
        if not self.store.close_failed_round(number, self.config().round_deadline_s):
            raise Conflict(f"round {number} is not the current failed round any more; see /status")
        log.warning("round %d: closed by the admin without a new global version", number)
        return self.current()

    def _failed_round(self, number: int) -> Round:
        current = self.current()
        target = self.store.round(number)
        if target is None:
            raise NotFound(f"round {number} does not exist; the current round is {current.round}",
                           current_round=current.round)
        if target.status != "failed" or target.closed_at is not None:
            state = "closed by the admin" if target.status == "failed" else target.status
            raise Conflict(f"round {number} is {state}; only a failed round awaiting the admin can be retried or "
                           f"closed (the current round is {current.round}, {current.status})",
                           current_round=current.round)
        return target

    def _uploads(self, config: FederationConfig, updates: list) -> list[Upload]:
        """Every stored upload of a round in memory, with the device's rank and the federation's LoRA alpha
        (per-device rules read each module's scale from its factors' rank)."""
        devices = {d.id: d for d in self.store.devices()}
        out = []
        for position, update in enumerate(updates):
            with safe_open(str(update.path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            rank = int(devices[update.device_id].capabilities["rank"])
            out.append(Upload(position, tensors, update.tokens, rank, config.alpha))
        return out

    def recover(self) -> None:
        """Remove upload blobs a crash left without their rows, and redo aggregations a crash interrupted. Never
        raises: a round that cannot be aggregated ends ``failed`` and the server starts anyway."""
        try:
            for path in self.store.remove_orphan_blobs():
                log.warning("removed %s: an upload a crash left without its database row (the device uploads again)",
                            path.relative_to(self.store.data_dir))
        except Exception:  # leftover files cost disk only; the recovery below matters more
            log.exception("removing upload files without rows failed; the server starts anyway")
        try:
            for r in self.store.rounds("aggregating"):
                log.warning("redoing the interrupted aggregation of round %d", r.round)
                self.aggregate(r.round)
            for r in self.store.rounds("failed"):
                if r.closed_at is None:
                    log.warning("round %d failed to aggregate (%s); retry or close it: POST /admin/rounds/%d/retry "
                                "or /close", r.round, r.failure, r.round)
        except Exception:
            log.exception("recovering interrupted rounds failed; the server starts anyway")


def _mean_metrics(all_metrics: list[dict]) -> dict[str, float]:
    keys = sorted({k for m in all_metrics for k in m})
    return {k: sum(m[k] for m in all_metrics if k in m) / sum(1 for m in all_metrics if k in m) for k in keys}
