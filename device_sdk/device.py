"""A federated device: the object an edge app embeds. It holds the base model, the device's adapters and data,
and runs Algorithm 1's rounds against the aggregator; specialists and routers never leave it."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .budget import MAX_SPECIALISTS, BudgetDecision, model_shape, specialists_for_budget
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .client import AggregatorClient, RetryPolicy, ServerRejected
from .config import TrainConfig, positive_number
from .data import UserData, load_user_data
from .enrollment import CREDENTIALS, NotEnrolled, credentials
from .errors import BudgetError, Cancelled, ConfigError
from .evaluate import evaluate, loss_with
from .federated import Upload
from .federated.wire import encode_upload
from .fileio import atomic_write_bytes
from .inject import inject_adapters
from .models import check_model_name, default_cache_dir, load_base_model, model_skeleton
from .parts import Role
from .peft_adapters import load_peft_adapter
from .round import load_initial, receive_global, run_device_round
from .runfolder import hold_folder
from .strategies import DEFAULT_NETWORKED, networked_strategy
from .strategies.base import device_upload
from .train import init_train_state, valid_loss

log = logging.getLogger(__name__)

#: Settings the federation fixes: DeviceConfig field -> FederationConfig field.
FEDERATION_FIELDS = {"model": "base_model", "strategy": "strategy", "rank": "rank", "alpha": "alpha"}


class FederationMismatch(ConfigError):
    """A device setting contradicts the federation's (``field``: the DeviceConfig field; ``mine``, ``theirs``)."""

    def __init__(self, field: str, mine, theirs, server: str) -> None:
        super().__init__(f"{field} {mine!r} contradicts the federation's {field} {theirs!r} (at {server}); leave "
                         f"{field} unset to take the federation's")
        self.field, self.mine, self.theirs, self.server = field, mine, theirs, server



@dataclass(frozen=True)
class DeviceConfig:
    """A device taking part in a federation.

    Attributes:
        server: the aggregator's URL.
        data: the user's data folder.
        state_dir: where credentials and checkpoints live (a device restarted with the same folder resumes).
        enroll_secret: the admin's enrollment secret (needed only the first time).
        model: base model name; ``None`` (the default) takes the federation's, another value must equal it.
        name: the device's name in the admin's views, which anyone who reaches the aggregator can read (``None``:
            the data folder's name; never the host name, which may identify the phone's owner).
        train: local training; ``steps`` is the number of expert steps per round.
        rounds: rounds to take part in (counted across restarts).
        rank, alpha: one expert's LoRA rank r and alpha (scale alpha / sqrt(r), paper eq. 4); ``None`` takes the
            federation's, another value must equal it.
        n_specialists: specialist count; ``None`` picks it from ``budget_mb`` (1 without a budget) and
            ``budget_step_s`` (seconds per expert step; the decision is kept in ``Device.budget``). A restarted
            device keeps the count it was set up with.
        strategy: the collaboration strategy (see :func:`device_sdk.strategies.networked_strategy`); ``None`` takes
            the federation's, another value must equal it. Strategies with two modules everywhere (fedavg, pfedmoe,
            pcl, ffa-lora, comigs-2s/2g/1g1s) ignore the specialist count; hetlora-*/flexlora-* turn it into one
            LoRA of a matching rank.
        eval_tokens: test tokens for the per-round test perplexity (``None``: the whole test set, 0: skip).
        peer_eval_tokens: validation tokens per peer model where the strategy scores peers (pcl).
    """

    server: str
    data: Path
    state_dir: Path
    enroll_secret: str | None = None
    model: str | None = None
    name: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=10))
    rounds: int = 3
    rank: int | None = None
    alpha: float | None = None
    n_specialists: int | None = None
    budget_mb: float | None = None
    budget_step_s: float | None = None
    eval_tokens: int | None = 0
    poll_s: float = 0.2
    seed: int = 0
    cache_dir: Path | None = None
    retry: RetryPolicy = RetryPolicy()
    strategy: str | None = None
    peer_eval_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.strategy is not None:
            networked_strategy(self.strategy)  # fails early, naming the supported strategies
        problems = []
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if self.n_specialists is not None and self.n_specialists < 0:
            problems.append(f"n_specialists must be >= 0, got {self.n_specialists}")
        if self.budget_mb is not None and not positive_number(self.budget_mb):
            problems.append(f"budget_mb must be a positive number of MiB, got {self.budget_mb!r}")
        if self.budget_step_s is not None and not (self.budget_mb is not None and positive_number(self.budget_step_s)):
            problems.append(f"budget_step_s must be a positive number of seconds and goes with budget_mb, got "
                            f"{self.budget_step_s!r}")
        if not positive_number(self.poll_s):
            problems.append(f"poll_s must be a positive number of seconds, got {self.poll_s!r}")
        if self.peer_eval_tokens < 1:
            problems.append(f"peer_eval_tokens must be >= 1, got {self.peer_eval_tokens}")
        if problems:
            raise ConfigError("invalid DeviceConfig: " + "; ".join(problems))

    def with_federation(self, federation: dict) -> DeviceConfig:
        """This config with every unset federation setting (model, strategy, rank, alpha) taken from the
        federation's configuration (``GET /status``).

        Raises:
            FederationMismatch: for a setting given here that differs from the federation's.
        """
        resolved = {}
        for mine, theirs in FEDERATION_FIELDS.items():
            value, expected = getattr(self, mine), federation.get(theirs)
            if value is not None and expected is not None and value != expected:
                raise FederationMismatch(mine, value, expected, self.server)
            resolved[mine] = value if expected is None else expected
        if resolved["model"] is None:  # a server that does not say (older): the defaults
            resolved["model"] = "smollm2-135m"
        for name, default in (("strategy", DEFAULT_NETWORKED), ("rank", 8), ("alpha", 16.0)):
            if resolved[name] is None:
                resolved[name] = default
        return replace(self, **resolved)


#: Name prefix of an encoded upload kept in the state folder until the server has it (``-<round>.safetensors``).
PENDING_UPLOAD = "pending-upload"


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
        """Check the server and this device's credentials (enrolling on the first start), then load the model.

        The server is asked first, so that a wrong URL, token, secret or setting fails before the base model
        loads (seconds to minutes).

        Raises:
            ServerUnreachable, ServerRejected: the server is down or refused (wrong token or secret, ...).
            FederationMismatch: ``cfg`` contradicts the federation's model, strategy, rank or alpha.
            NotEnrolled: no credentials in ``state_dir`` and no ``enroll_secret``.
            RunFolderError: another process is using ``state_dir``.
        """
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.state_dir / "checkpoints"
        hold_folder(self.state_dir, "state_dir")  # a second process on it would upload and checkpoint over this one
        with AggregatorClient(cfg.server, retry=cfg.retry) as probe:
            probe.health()
            federation = probe.federation_config()
        if federation is None:
            raise ConfigError(f"the aggregator at {cfg.server} has no federation yet; the admin creates it with "
                              "`python -m device_sdk init-federation`")
        cfg = cfg.with_federation(federation)
        self.cfg = cfg
        check_model_name(cfg.model)
        cache = cfg.cache_dir or default_cache_dir()
        self.strategy = networked_strategy(cfg.strategy)
        self.strategy.rank = cfg.rank  # one expert's rank; rank-per-device strategies scale it
        self.base_name = cfg.model
        checkpoint = latest_checkpoint(self.checkpoints)
        self.n_experts = self._expert_count(cache, checkpoint)
        self.adapter = replace(self.strategy.adapter_config(0, self.n_experts), alpha=cfg.alpha)
        self._creds = self._credentials()  # enrolls on the first start
        self.client = AggregatorClient(cfg.server, self._creds["token"], cfg.retry)
        try:
            self.client.check_device_token()
        except ServerRejected as err:
            raise ConfigError(f"the aggregator at {cfg.server} does not know the device token in "
                              f"{self.state_dir / CREDENTIALS} ({err.detail}): that state_dir belongs to another "
                              "federation; use another state_dir, or delete this one to enroll afresh") from err
        log.info("aggregator at %s: device %d, federation of %s (strategy %s, rank %d, alpha %g)", cfg.server,
                 self.device_id, cfg.model, cfg.strategy, cfg.rank, cfg.alpha)
        log.info("loading base model %s", cfg.model)

        base = load_base_model(cfg.model, cache_dir=cache)  # every device shares one base
        self.tokenizer = base.tokenizer
        # the seed also fixes the global RNG that dropout in a base model's MLP (GPT-2) draws from during training
        torch.manual_seed(cfg.seed)
        # on the training config's device (adapters initialised on the CPU); uploads leave as CPU copies
        self.model = inject_adapters(base.model, self.adapter).to(cfg.train.device)
        self.strategy.prepare(0, self.model)
        self.data: UserData = load_user_data(cfg.data, base.tokenizer, cache_dir=cache)
        schedule = cfg.train.steps * cfg.rounds
        program = cfg.train.program
        if cfg.train.backend == "executorch" and program is None:  # kept with the state: exported once
            program = str(self.state_dir / "train-program")
        self.train_cfg = replace(cfg.train, schedule_steps=max(schedule, cfg.train.schedule_steps or 0),
                                 seed=cfg.seed, program=program, **self.strategy.train_overrides())
        self.state = init_train_state(self.model, self.train_cfg)
        self.completed_rounds = 0  # rounds this device uploaded to (or tried to)
        self.last_round = 0
        self.global_version: int | None = None
        if checkpoint is not None:
            self._resume(checkpoint)

    def _resume(self, checkpoint: Path) -> None:
        """Load the model's adapters, the training state and the round counters of ``checkpoint`` (optimizer
        moments it does not hold, from a stopped round's steps, are dropped)."""
        for optimizer in (self.state.expert_opt, self.state.router_opt):
            if optimizer is not None:
                optimizer.state.clear()
        info = load_checkpoint(checkpoint, self.model, self.state, self.base_name)
        self.completed_rounds, self.last_round = info["completed_rounds"], info["round"]
        self.global_version = info["global_version"]
        self.strategy.state = info.get("strategy_state", {})
        log.info("resumed from %s (round %d, %d round(s) done)", checkpoint.name, self.last_round,
                 self.completed_rounds)

    def _expert_count(self, cache: Path, checkpoint: Path | None) -> int:
        """Experts per MLP block: those of the checkpoint a restarted device resumes (a budget that gives another
        count now, say the memory free at this start, does not change a device's experts), else 1 + specialists.

        Raises:
            ConfigError: ``n_specialists`` asks for another count than the checkpoint holds.
        """
        info = json.loads((checkpoint / "state.json").read_text()) if checkpoint else {}
        saved = info.get("n_experts")
        if saved is None and "adapter" in info:  # a checkpoint from before n_experts was kept: match its adapters
            saved = next((n for n in range(1, MAX_SPECIALISTS + 2)
                          if json.loads(json.dumps(replace(self.strategy.adapter_config(0, n),
                                                           alpha=self.cfg.alpha).to_dict())) == info["adapter"]), None)
        try:
            wanted = 1 + self._specialist_count(cache)
        except BudgetError as err:
            if saved is None:
                raise
            log.warning("%s; this device was set up with %d specialist(s) and keeps them", err, saved - 1)
            return saved
        if saved is None or saved == wanted:
            return wanted
        if self.cfg.n_specialists is not None:
            raise ConfigError(f"{self.state_dir} holds a device with {saved - 1} specialist(s); n_specialists="
                              f"{self.cfg.n_specialists} asks for another count, but a device keeps its experts: pass "
                              f"n_specialists={saved - 1}, or use a new state_dir for a new device")
        log.warning("the budget now gives %d specialist(s); this device was set up with %d and keeps them",
                    wanted - 1, saved - 1)
        return saved

    def _specialist_count(self, cache: Path) -> int:
        """From ``n_specialists``, else from ``budget_mb`` and the base model's shape (read without its weights)."""
        self.budget: BudgetDecision | None = None
        if self.cfg.n_specialists is not None:
            return self.cfg.n_specialists
        if self.cfg.budget_mb is None:
            return 1
        tokens = self.cfg.train.batch_size * self.cfg.train.context
        skeleton = model_skeleton(self.cfg.model, cache)
        self.budget = specialists_for_budget(model_shape(skeleton), self.cfg.budget_mb, tokens, self.cfg.rank,
                                             precision=self.cfg.train.precision, max_step_s=self.cfg.budget_step_s)
        return self.budget.n_specialists

    def _credentials(self) -> dict:
        return credentials(self.cfg.server, self.state_dir, self.cfg.enroll_secret,
                           self.cfg.name or Path(self.cfg.data).name,
                           {"n_specialists": self.adapter.n_specialists, "n_generalists": self.adapter.n_generalists,
                            "rank": self.adapter.rank, "base_model": self.base_name, "strategy": self.cfg.strategy,
                            "alpha": self.adapter.alpha}, self.cfg.retry)

    @property
    def device_id(self) -> int:
        return int(self._creds["device_id"])

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
            load_initial(self.strategy, self.model, tensors)
        else:
            receive_global(self.strategy, 0, self.model, tensors, self.peer_loss, own=self.own_upload())

    def sync(self, version: int) -> None:
        """Load global version ``version`` unless it is loaded and untrained since."""
        if self.global_version != version:
            self.load_global(self.client.download_global(version), version)
            self.global_version = version

    @staticmethod
    def _pause(seconds: float, stop: threading.Event | None) -> None:
        """Sleep between polls; raise :class:`Cancelled` as soon as ``stop`` is set."""
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise Cancelled("stopped while waiting for the aggregator")

    def _wait_for_new_round(self, stop: threading.Event | None = None) -> dict:
        """The current round once it is open, newer than this device's last and not yet reported to. A round that
        is closing (its global is being computed) or failed (waiting for the admin to retry or close it) takes no
        uploads: training for it would be wasted and count as a round done."""
        delay, waiting = self.cfg.poll_s, None
        while True:
            current = self.client.current_round()
            if current["round"] > self.last_round and not current["you_reported"]:
                if current["status"] == "open":
                    return current
                if (current["round"], current["status"]) != waiting:
                    waiting = current["round"], current["status"]
                    why = (f"failed to aggregate ({current.get('failure')}); waiting for the admin to retry or close it"
                           if current["status"] == "failed" else f"is {current['status']}; waiting for the next round")
                    log.info("round %d %s", current["round"], why)
            self._pause(delay, stop)
            delay = min(2.0, delay * 1.5)

    def checkpoint(self) -> None:
        save_checkpoint(self.checkpoints, self.model, self.state, self.base_name,
                        {"round": self.last_round, "completed_rounds": self.completed_rounds,
                         "global_version": self.global_version, "adapter": self.adapter.to_dict(),
                         "n_experts": self.n_experts,
                         "strategy_state": self.strategy.state})

    # uploads that must survive a failure or a crash --------------------------------------------------------------
    def _pending(self) -> list[tuple[int, Path]]:
        """``(round, file)`` of the encoded uploads written before sending, oldest first."""
        found = []
        for path in self.state_dir.glob(f"{PENDING_UPLOAD}-*.safetensors"):
            try:
                found.append((int(path.stem.rsplit("-", 1)[1]), path))
            except ValueError:
                continue
        return sorted(found)

    def _send(self, number: int, pending: Path, payload: bytes | None = None) -> tuple[bool, str]:
        """Upload round ``number``'s pending file (``payload``: its bytes, when at hand); ``(accepted, reason)``,
        not accepted when the round closed first. Once the server has answered, the file is removed: accepted,
        closed, or refused (``ServerRejected`` is raised: sending again would get the same answer). A connection
        failure raises and leaves it for the next try."""
        try:
            self.client.upload_payload(number, pending.read_bytes() if payload is None else payload)
        except ServerRejected as err:
            pending.unlink(missing_ok=True)
            if err.code != "round_closed":
                raise
            log.warning("round %d closed before this device reported: %s", number, err.detail)
            return False, err.detail
        pending.unlink(missing_ok=True)
        return True, ""

    def flush_pending_upload(self) -> bool:
        """Send an upload that a failed call or a crash left unsent (the server answers a repeat as the first, so
        one that did arrive is not counted twice). Returns whether there was one.

        Raises:
            ServerUnreachable, ServerRejected: as an upload; the file stays for the next try.
        """
        pending = self._pending()
        for number, path in pending:
            if number < self.last_round:  # a round this device has moved past: nothing to send any more
                path.unlink(missing_ok=True)
                continue
            if number > self.last_round:
                # a crash after the file, before the checkpoint: the round's local training is lost, not its upload
                log.warning("round %d's upload was saved but not its training state: sending the upload; the "
                            "specialists resume from round %d", number, self.last_round)
                self.last_round, self.global_version = number, None
                self.completed_rounds += 1
                self.checkpoint()
            log.info("round %d: sending the upload a failed try or a restart left", number)
            try:
                self._send(number, path)
            except ServerRejected as err:
                log.error("round %d: the server refused this device's upload (%s); it is dropped", number, err)
        return bool(pending)

    # one round of Algorithm 1 ---------------------------------------------------------------------------------------
    def run_round(self, progress: bool = False, stop: threading.Event | None = None,
                  on_step: Callable[[dict], None] | None = None) -> RoundReport:
        """Fetch the global shared tensors, train locally (bi-level), upload the shared tensors, checkpoint.

        The upload is written to the state folder, with a checkpoint, before it is sent: when sending fails (the
        network stays down past the retries) or the app is killed, the next :meth:`run_round` (or
        :meth:`final_sync`) sends it first, and the round is not trained again.

        Args:
            progress: show a progress bar (a terminal).
            stop: an app's event (another thread sets it when the app goes to the background, say): training stops
                at the next step, a wait at its next poll, and :class:`~device_sdk.errors.Cancelled` is raised with
                the device back at its last checkpoint; a later call starts the round again.
            on_step: called after every expert step with ``{"step", "done", "of", "loss", "lr", ...}``.

        Raises:
            Cancelled: ``stop`` was set.
            ServerUnreachable, ServerRejected: as the client's calls (an upload stays pending, see above).
        """
        self.flush_pending_upload()
        current = self._wait_for_new_round(stop)
        number = current["round"]
        if latest_checkpoint(self.checkpoints) is None:
            self.checkpoint()  # something to go back to if the app stops this first round
        self.sync(current["base_version"])
        log.info("round %d: training on global version %d", number, current["base_version"])
        start = time.perf_counter()

        def step_done(stats: dict) -> None:
            if on_step is not None:
                on_step(stats)
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped in round {number} at step {stats['done']} of {stats['of']}")

        pending = self.state_dir / f"{PENDING_UPLOAD}-{number:06d}.safetensors"
        try:
            done = run_device_round(self.strategy, 0, self.model, self.state, self.data, self.train_cfg,
                                    progress=progress, on_step=step_done)
            result, train_loss = done.result, done.train_loss
            v_loss = (result.valid[-1]["loss"] if result.valid
                      else valid_loss(self.model, self.data.valid, self.train_cfg))
            metrics = {"train_loss": train_loss, "valid_loss": v_loss}
            payload = encode_upload(done.upload.tensors, result.tokens, metrics)
            atomic_write_bytes(pending, payload)
        except BaseException:  # Cancelled, or any failure before the upload is safe: back to the last checkpoint,
            self._resume(latest_checkpoint(self.checkpoints))  # so the round is trained once
            raise
        # the shared tensors are this device's own now, no global version: the next sync loads one, also the same
        # version again (after the admin closes a failed round, the next round starts from the last published one)
        self.global_version = None
        self.state = done.state
        self.last_round = number
        self.completed_rounds += 1
        self.checkpoint()
        accepted, reason = self._send(number, pending, payload)
        return RoundReport(number, accepted, result.tokens, train_loss, v_loss, None,
                           time.perf_counter() - start, reason)

    def final_sync(self, stop: threading.Event | None = None) -> int:
        """Send a pending upload (see :meth:`run_round`), wait for the round this device last reported to close and
        load the resulting global version.

        Raises:
            Cancelled: ``stop`` was set while waiting.
        """
        self.flush_pending_upload()
        delay = self.cfg.poll_s
        while True:
            current = self.client.current_round()
            if current["round"] > self.last_round:
                self.sync(current["base_version"])
                self.checkpoint()
                return current["base_version"]
            self._pause(delay, stop)
            delay = min(2.0, delay * 1.5)

    def test_perplexity(self) -> float:
        tokens = None if self.cfg.eval_tokens in (None, 0) else self.cfg.eval_tokens
        return evaluate(self.model, self.data.test, self.train_cfg.context, max(8, self.train_cfg.batch_size),
                        self.train_cfg.precision, max_tokens=tokens, spread=True).perplexity

    def run(self, progress: bool = False, stop: threading.Event | None = None) -> list[RoundReport]:
        """Take part until ``cfg.rounds`` rounds are done (counting rounds done before a restart), then sync.
        ``stop``: as in :meth:`run_round` (:class:`~device_sdk.errors.Cancelled`; a later call goes on)."""
        return list(self.rounds(progress, stop))

    def rounds(self, progress: bool = False, stop: threading.Event | None = None) -> Iterator[RoundReport]:
        """Like :meth:`run`, yielding each round's report as soon as the round is done."""
        self.flush_pending_upload()  # a pending upload of the last round completes it: no extra round
        while self.completed_rounds < self.cfg.rounds:
            report = self.run_round(progress, stop)
            if self.cfg.eval_tokens != 0:
                report.test_perplexity = self.test_perplexity()
            log.info("round %d: %s, train loss %.3f, valid loss %.3f%s", report.round,
                     "uploaded" if report.accepted else "late", report.train_loss, report.valid_loss,
                     "" if report.test_perplexity is None else f", test ppl {report.test_perplexity:.2f}")
            yield report
        self.final_sync(stop)


def initial_shared_tensors(model_name: str, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                           cache_dir: Path | None = None, strategy: str = DEFAULT_NETWORKED,
                           max_experts: int = 4, initial_adapter: Path | None = None) -> dict[str, torch.Tensor]:
    """Global version 0 for a federation: the strategy's freshly initialised shared tensors (CoMiGS: attention LoRA
    and generalists; B = 0; FFA-LoRA: also the A matrices every device keeps fixed). Strategies with a rank per
    device (hetlora-*, flexlora-*) get the rank of a device with ``max_experts`` experts, the largest the
    federation then admits; each device keeps the first components of its own rank.

    ``initial_adapter``: a PEFT LoRA adapter folder that seeds the attention LoRA and the generalist (expert 0)
    instead (:func:`device_sdk.peft_adapters.load_peft_adapter`: ranks, targets and layer shapes must match; a
    plain ``lora_alpha / r`` scale is converted). Other generalists keep their fresh initialisation.

    Raises:
        PeftAdapterError: the adapter does not fit (the message names the mismatch). ConfigError: the strategy
            shares no generalist to seed.
    """
    chosen = networked_strategy(strategy)
    chosen.rank = rank
    adapter = replace(chosen.adapter_config(0, max(2, max_experts)), alpha=alpha)
    if initial_adapter is not None and (adapter.n_generalists == 0 or Role.GENERALIST not in chosen.shared_roles):
        raise ConfigError(f"strategy {strategy!r} shares no generalist expert, so --initial-adapter has nothing to "
                          "seed; use a strategy with a shared generalist (e.g. comigs-1gxs, fedavg)")
    base = load_base_model(model_name, cache_dir=cache_dir or default_cache_dir())
    with torch.random.fork_rng(devices=[]):  # seeds the initialisation only, not the caller's RNG
        torch.manual_seed(seed)
        model = inject_adapters(base.model, adapter)
        chosen.prepare(0, model)
    if initial_adapter is not None:
        load_peft_adapter(model, initial_adapter, expert=0)
    return chosen.initial_tensors(model)


__all__ = ["Device", "DeviceConfig", "FederationMismatch", "NotEnrolled", "RoundReport", "initial_shared_tensors"]
