"""Typed, frozen configurations, validated early (every problem reported at once)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .backends import BACKENDS
from .device_select import resolve_placement
from .errors import ConfigError
from .federated.tensors import lora_scale  # defined once, with the federated rules that weigh by it

ROUTING_MODES = ("auto", "dense", "sparse")
#: How a block mixes its experts: ``mlp`` (each expert a whole MLP, outputs mixed; the paper's model) or
#: ``projection`` (gates applied to the low-rank update of every projection around one shared nonlinearity).
MIXINGS = ("mlp", "projection")
#: Load balancing (losses.py): ``switch`` (uniform weights), ``importance`` (generalist-favoured, paper eq. 5), each
#: with the fraction f_j taken from the top-k gates (it keeps a gradient when k = E); ``count`` and
#: ``importance-count`` take f_j as the fraction of top-k memberships (paper eq. 6); ``none``.
LB_MODES = ("switch", "importance", "count", "importance-count", "none")
#: Expert learning-rate schedules: ``one-cycle`` (linear warm-up, cosine decay) or ``cosine`` (cosine decay from the
#: peak, no warm-up: the authors' code, torch's CosineAnnealingLR).
SCHEDULES = ("one-cycle", "cosine")
#: The optimizer of the authors' code (epfml/CoMiGS, ``collab_utils/clients.py``): AdamW betas (0.9, 0.95), weight
#: decay 0.01 on experts and routers, expert cosine schedule ending at lr/10 without warm-up, no gradient clipping.
#: Its LoRA dropout defaults to 0, so LoRA has none here either. The simulation presets use it (docs/strategies.md).
REFERENCE_OPTIMIZER = {"betas": (0.9, 0.95), "weight_decay": 0.01, "schedule": "cosine", "final_lr_fraction": 0.1,
                       "grad_clip": 0.0}
#: How routers learn: ``validation`` (CoMiGS: s steps on validation batches every tau expert steps), ``train`` (the
#: same schedule on fresh training batches; the paper's Table 4 ablation), ``joint`` (one optimizer step of experts
#: and routers together on each training batch, as pFedMoE), ``fixed`` (never trained; uniform gates).
ROUTER_MODES = ("validation", "train", "joint", "fixed")
#: Largest concatenated rank E*r that ``routing="auto"`` mixes densely.
DENSE_MAX_RANK = 256


def positive_number(value: object) -> bool:
    """A positive finite real number (not a bool, not a string): the check of every size, budget and bound setting."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the adapters attached to a base model.

    Attributes:
        rank: LoRA rank r of every MLP expert (paper: 8).
        alpha: LoRA alpha; every LoRA's update is scaled by ``alpha / sqrt(r)`` with its own rank r (paper eq. 4,
            rank-stabilised; see :func:`lora_scale`).
        attention_rank: LoRA rank of the attention projections (``None``: ``rank``). HetLoRA / FlexLoRA scale only
            the MLP rank with a device's budget and keep the attention LoRA at the expert rank (8), as every other
            strategy has it (paper section 4.3.1; the authors' code).
        n_generalists: generalist experts per MLP block (experts ``0 .. n_generalists-1``; shared across devices).
        n_specialists: specialist experts per MLP block (after the generalists; never leave the device).
        top_k: experts mixed per token; the effective k is ``min(top_k, n_experts)``.
        mixing: ``mlp`` (default, the paper's model): expert e is the block's MLP with its own LoRA on each MLP
            projection and the block outputs ``sum_e g_e MLP_e(x)`` (:mod:`device_sdk.mixture`); ``projection``:
            every projection adds ``sum_e g_e B_e A_e x`` around one shared nonlinearity (the SDK's earlier form).
        routing: ``dense`` keeps every shape fixed (projection form: one gated, concatenated rank-``E*r`` update;
            mlp form: k slots per token, each running its selected expert through masked concatenated low-rank
            terms), ``sparse`` runs each expert only on its routed tokens; ``auto`` is dense while
            ``E*r <= DENSE_MAX_RANK`` and sparse beyond (measured in benchmarks/train_step.py).
        router_init_std: standard deviation of the router's normal initialisation.
        attention_targets: attention projections that get one LoRA each (``None``: the family default).
        mlp_module: name (suffix) of the MLP blocks that become mixtures (``None``: the family default).
        mlp_targets: projections inside an MLP block that get LoRA experts (``None``: the family default).
    """

    rank: int = 8
    alpha: float = 16.0
    attention_rank: int | None = None
    n_generalists: int = 1
    n_specialists: int = 1
    top_k: int = 2
    routing: str = "auto"
    mixing: str = "mlp"
    router_init_std: float = 0.02
    attention_targets: tuple[str, ...] | None = None
    mlp_module: str | None = None
    mlp_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.rank, int) or self.rank <= 0:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if self.attention_rank is not None and (not isinstance(self.attention_rank, int)
                                                or isinstance(self.attention_rank, bool) or self.attention_rank <= 0):
            problems.append(f"attention_rank must be a positive integer or None, got {self.attention_rank!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if self.n_generalists < 0 or self.n_specialists < 0:
            problems.append(
                f"expert counts must be >= 0, got n_generalists={self.n_generalists}, "
                f"n_specialists={self.n_specialists}"
            )
        elif self.n_experts < 1:
            problems.append("a mixture needs at least one expert (n_generalists + n_specialists >= 1)")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.routing not in ROUTING_MODES:
            problems.append(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.mixing not in MIXINGS:
            problems.append(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.router_init_std < 0:
            problems.append(f"router_init_std must be >= 0, got {self.router_init_std}")
        _raise_if(problems, "AdapterConfig")

    @property
    def n_experts(self) -> int:
        return self.n_generalists + self.n_specialists

    @property
    def k(self) -> int:
        """Experts mixed per token."""
        return min(self.top_k, self.n_experts)

    @property
    def scale(self) -> float:
        """LoRA scale gamma of the MLP experts, ``alpha / sqrt(rank)`` (paper eq. 4)."""
        return lora_scale(self.alpha, self.rank)

    @property
    def attention_lora_rank(self) -> int:
        """The attention LoRA's rank: ``attention_rank``, or ``rank`` when unset."""
        return self.rank if self.attention_rank is None else self.attention_rank

    @property
    def attention_scale(self) -> float:
        """LoRA scale gamma of the attention LoRA, ``alpha / sqrt(attention rank)`` (paper eq. 4)."""
        return lora_scale(self.alpha, self.attention_lora_rank)

    @property
    def sparse(self) -> bool:
        return self.routing == "sparse" or (self.routing == "auto" and self.n_experts * self.rank > DENSE_MAX_RANK)

    def to_dict(self) -> dict:
        return asdict(self)


#: AdapterConfig fields a program computes in its graph rather than holds in its tensors' names or shapes: a
#: program and adapters that differ in one of them have the same tensors and compute another model.
GRAPH_FIELDS = ("alpha", "attention_rank", "top_k", "routing", "mixing", "n_generalists")


def graph_differences(program: dict, adapters: dict, fields: tuple[str, ...] = GRAPH_FIELDS) -> list[str]:
    """``"<field> <program's> (program) vs <adapters'> (adapters)"`` for each of ``fields`` on which two adapter
    configurations (:meth:`AdapterConfig.to_dict`, or as many of its fields as are known) differ; a field either
    lacks is not compared, and an unset attention rank is the rank."""
    def value(config: dict, key: str):
        return config.get("rank") if key == "attention_rank" and config.get(key) is None else config.get(key)

    return [f"{key} {value(program, key)!r} (program) vs {value(adapters, key)!r} (adapters)" for key in fields
            if key in program and key in adapters and value(program, key) != value(adapters, key)]


@dataclass(frozen=True)
class TrainConfig:
    """The bi-level local update (Algorithm 1, inner part). Defaults follow the paper (section 4.1.2, appendix B)
    except the batch size, which is 64 in the paper and 8 here to fit a 2-core CPU.

    Attributes:
        steps: expert steps in this run.
        batch_size: sequences per step (training and validation batches alike).
        context: tokens per sequence (paper: 128).
        lr_experts: peak learning rate of the expert optimizer (see ``schedule``).
        lr_router: constant learning rate of the router optimizer.
        betas: AdamW betas of both optimizers.
        weight_decay: AdamW weight decay of both optimizers.
        lb_weight: lambda, weight of the load-balancing loss.
        lb_mode: ``switch`` (uniform), ``importance`` (generalist-favoured, paper eq. 5) or ``none``.
        router_period: tau; after every tau-th expert step the router takes ``router_steps`` steps.
        router_steps: s, router steps per router update, each on a fresh validation batch.
        schedule: expert learning-rate schedule, one of :data:`SCHEDULES`.
        final_lr_fraction: the schedule ends at ``final_lr_fraction * lr_experts``.
        schedule_steps: length of the schedule (``None``: ``steps``); a federation spans all rounds.
        warmup_fraction: fraction of the one-cycle schedule spent warming up.
        grad_clip: max global gradient norm per optimizer (0 disables).
        precision: ``bf16`` runs forward/backward under CPU bf16 autocast (adapters stay fp32), ``fp32`` does not;
            ``auto`` (the default) becomes ``bf16`` on CPUs with native bf16 and ``fp32`` elsewhere
            (:mod:`device_sdk.precision`), so a built config always holds one of the two. On a CUDA ``device``
            autocast runs on the GPU and ``auto`` means bf16 where ``torch.cuda.is_bf16_supported()``.
        device: where training runs: ``auto`` (the default: ``cuda`` when ``torch.cuda.is_available()``, else
            ``cpu``), ``cpu``, ``cuda`` or ``cuda:N`` (:mod:`device_sdk.device_select`); a built config holds the
            resolved device, and the model must live there (batches are moved to it).
        seed: seeds batch sampling and adapter initialisation.
        log_every: record the training loss every this many steps.
        eval_every: evaluate validation loss every this many steps (0: only at the end).
        eval_batches: validation batches per periodic evaluation.
        router_mode: one of :data:`ROUTER_MODES`.
        freeze_lora_a: keep every LoRA ``A`` matrix at its initial value (FFA-LoRA).
        backend: how losses and gradients are computed, one of :data:`device_sdk.backends.BACKENDS`: ``pytorch``
            (eager autograd) or ``executorch`` (an exported ExecuTorch training program, fp32 on the CPU; ``auto``
            precision becomes ``fp32``; see :mod:`device_sdk.backends.executorch`).
        program: with ``backend="executorch"``, the training program's folder (exported there on first use when
            it holds none that fits); ``None``: a temporary folder.
        compile: run the decoder blocks through ``torch.compile`` in training steps
            (:func:`device_sdk.compiled.compile_blocks`): the same numbers to float rounding, faster steps after a
            one-time compilation of about a minute per step kind (needs a C++ compiler on a CPU). Blocks with sparse
            routing stay eager. Backend ``pytorch`` only.
    """

    steps: int = 100
    batch_size: int = 8
    context: int = 128
    lr_experts: float = 2e-3
    lr_router: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lb_weight: float = 0.01
    lb_mode: str = "switch"
    router_period: int = 30
    router_steps: int = 10
    schedule: str = "one-cycle"
    final_lr_fraction: float = 1e-3
    schedule_steps: int | None = None
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 8
    router_mode: str = "validation"
    freeze_lora_a: bool = False
    backend: str = "pytorch"
    program: str | None = None
    compile: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "context", "router_period", "log_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("router_steps", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr_experts", "lr_router"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.lb_weight < 0 or self.grad_clip < 0:
            problems.append("weight_decay, lb_weight and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.final_lr_fraction <= 1:
            problems.append(f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")
        if self.lb_mode not in LB_MODES:
            problems.append(f"lb_mode must be one of {LB_MODES}, got {self.lb_mode!r}")
        if self.router_mode not in ROUTER_MODES:
            problems.append(f"router_mode must be one of {ROUTER_MODES}, got {self.router_mode!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        elif self.backend == "executorch":  # the program is fp32 on the CPU
            if self.precision == "auto":
                object.__setattr__(self, "precision", "fp32")
            elif self.precision != "fp32":
                problems.append(f"backend executorch trains in fp32 (its program has no autocast), got precision "
                                f"{self.precision!r}; use precision fp32 or auto")
            if self.device not in ("auto", "cpu"):
                problems.append(f"backend executorch runs on the CPU, got device {self.device!r}; use device cpu")
            else:
                object.__setattr__(self, "device", "cpu")
        if not isinstance(self.compile, bool):
            problems.append(f"compile must be True or False, got {self.compile!r}")
        elif self.compile and self.backend == "executorch":
            problems.append("compile must be off with backend executorch (an ExecuTorch program is compiled ahead of "
                            "time); compile works with backend pytorch")
        device, precision, placement = resolve_placement(self.device, self.precision)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "precision", precision)
        problems.extend(placement)
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            problems.append(f"schedule_steps ({self.schedule_steps}) must be >= steps ({self.steps})")
        if not 0 < self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        _raise_if(problems, "TrainConfig")

    def to_dict(self) -> dict:
        return asdict(self)
