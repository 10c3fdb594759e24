"""The bi-level local update of Algorithm 1 (inner part).

Expert parameters (attention LoRA, generalists, specialists) step on the training set; after every tau-th expert
step the routers take s steps on the validation set. Both objectives are LM loss + lambda * load-balancing loss
(eq. 2 and 3). Two optimizers over disjoint parameter sets: during an expert step the routers do not require
gradients (and vice versa), and both optimizers' gradients are cleared at every switch, so no gradient of one
objective reaches the other's update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .compiled import compile_blocks
from .config import TrainConfig
from .data import UserData, sample_batch
from .device_select import check_model_device
from .errors import ConfigError
from .evaluate import autocast, evaluate
from .inject import adapter_config, routed_blocks
from .losses import lm_loss, load_balancing_loss
from .parts import EXPERT_ROLES, Role, check_every_trainable_has_a_role, role_parameters

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What persists across calls to :func:`train_local` (e.g. across federated rounds).

    Attributes:
        expert_opt: AdamW over attention LoRA, generalists and specialists.
        router_opt: AdamW over routers (``None`` without routers).
        schedule: one-cycle cosine schedule of ``expert_opt``.
        step: expert steps taken so far (the tau counter runs on it).
        generator: batch-sampling random state.
        program: the ExecuTorch backend's gradient source (``cfg.backend="executorch"``; attached by
            :func:`train_local` on first use), ``None`` for eager autograd.
    """

    expert_opt: torch.optim.Optimizer
    router_opt: torch.optim.Optimizer | None
    schedule: torch.optim.lr_scheduler.LRScheduler
    step: int
    generator: torch.Generator
    program: Gradients | None = None


@dataclass
class TrainResult:
    """Curves and throughput of one :func:`train_local` call."""

    train: list[dict] = field(default_factory=list)  # {step, loss, lm, lb, lr}
    router: list[dict] = field(default_factory=list)  # {step, loss, lm, lb} per router step
    valid: list[dict] = field(default_factory=list)  # {step, loss}
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def expert_parameters(model: nn.Module, cfg: TrainConfig | None = None) -> list[nn.Parameter]:
    """Parameters of the expert optimizer (without LoRA ``A`` matrices when ``cfg.freeze_lora_a``)."""
    params = role_parameters(model, EXPERT_ROLES)
    if cfg is not None and cfg.freeze_lora_a:
        return [p for name, p in params.items() if not name.endswith("lora_A")]
    return list(params.values())


def frozen_lora_a(model: nn.Module, cfg: TrainConfig) -> list[nn.Parameter]:
    """The LoRA ``A`` matrices that FFA-LoRA keeps fixed (empty otherwise)."""
    if not cfg.freeze_lora_a:
        return []
    return [p for name, p in role_parameters(model, EXPERT_ROLES).items() if name.endswith("lora_A")]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(role_parameters(model, Role.ROUTER).values())


def init_train_state(model: nn.Module, cfg: TrainConfig) -> TrainState:
    """Fresh optimizers, schedule (spanning ``cfg.schedule_steps or cfg.steps``) and sampler for ``model``; with
    ``cfg.compile``, also runs ``model``'s decoder blocks compiled in training steps
    (:func:`device_sdk.compiled.compile_blocks`)."""
    if cfg.compile:
        blocks = compile_blocks(model)
        log.info("compile: %d decoder block(s) run through torch.compile in training steps%s", blocks,
                 "" if blocks else " (none: every block routes sparsely; training runs eager)")
    experts, routers = expert_parameters(model, cfg), router_parameters(model)
    expert_opt = torch.optim.AdamW(experts, lr=cfg.lr_experts, betas=cfg.betas, weight_decay=cfg.weight_decay)
    router_opt = None
    if routers and cfg.router_mode != "fixed":
        router_opt = torch.optim.AdamW(routers, lr=cfg.lr_router, betas=cfg.betas, weight_decay=cfg.weight_decay)
    total = cfg.schedule_steps or cfg.steps
    warmup = cfg.warmup_fraction if cfg.schedule == "one-cycle" else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        expert_opt, lambda step: one_cycle_cosine(step, total, warmup, end=cfg.final_lr_fraction))
    generator = torch.Generator().manual_seed(cfg.seed)
    return TrainState(expert_opt, router_opt, schedule, step=0, generator=generator)


def one_cycle_cosine(step: int, total: int, warmup_fraction: float, start: float = 0.04,
                     end: float = 1e-3) -> float:
    """Learning-rate multiplier of a one-cycle cosine schedule: a linear warm-up from ``start`` to 1 over
    ``warmup_fraction`` of ``total`` steps (at least one step), then a cosine decay to ``end`` at ``total``;
    constant at ``end`` past the end. ``warmup_fraction = 0`` is a plain cosine decay from 1 (torch's
    CosineAnnealingLR with ``eta_min = end * lr``)."""
    warmup = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 at the peak, 1 at the end
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _set_trainable(params: list[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


#: A training backend's step: ``(model, parameters to train, x, y) -> (total, lm, lb)``, setting ``.grad`` of exactly
#: those parameters (:class:`device_sdk.backends.executorch.ProgramGradients`).
Gradients = Callable[[nn.Module, list[nn.Parameter], torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]

#: An extra loss term on the model's adapters, added to the expert objective (e.g. HetLoRA's rank regulariser).
Regularizer = Callable[[nn.Module], torch.Tensor]


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              regularizer: Regularizer | None = None) -> tuple[torch.Tensor, ...]:
    """LM loss + lambda * load-balancing loss (+ ``regularizer(model)``) on one batch (eq. 2 / eq. 3).

    Args:
        x, y: (B, T) inputs and next-token targets, on the model's device (``cfg.device``).

    Returns:
        ``(total, lm, lb)`` scalars.
    """
    with autocast(cfg.precision, cfg.device):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    lm = lm_loss(logits, y)
    lb = load_balancing_loss(model, cfg.lb_mode, adapter_config(model).n_generalists)
    for block in routed_blocks(model):  # drop references into the autograd graph
        block.router_probs = block.gates = None
    total = lm + cfg.lb_weight * lb
    if regularizer is not None:
        total = total + regularizer(model)
    return total, lm, lb


def _step(model: nn.Module, groups: list[tuple[list[nn.Parameter], torch.optim.Optimizer]],
          frozen: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
          regularizer: Regularizer | None = None, program: Gradients | None = None) -> dict:
    """One step of every optimizer in ``groups`` (each clipped on its own parameters) with ``frozen`` excluded
    from autograd; all gradients cleared first. ``program``: gradients from the ExecuTorch backend instead of
    autograd (only the stepping parameters get one)."""
    train = [p for params, _ in groups for p in params]
    _set_trainable(frozen, False)
    _set_trainable(train, True)
    for p in train + frozen:
        p.grad = None
    if program is None:
        total, lm, lb = objective(model, x, y, cfg, regularizer)
        total.backward()
    else:
        total, lm, lb = program(model, train, x, y)
    for params, opt in groups:
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return {"loss": total.item(), "lm": lm.item(), "lb": float(lb.detach())}


def expert_step(model: nn.Module, state: TrainState, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                regularizer: Regularizer | None = None) -> dict:
    """One step of the expert optimizer on a training batch; routers stay untouched, except with
    ``router_mode="joint"``, where the router optimizer steps on the same batch and loss (pFedMoE)."""
    groups = [(expert_parameters(model, cfg), state.expert_opt)]
    frozen = frozen_lora_a(model, cfg)
    if cfg.router_mode == "joint" and state.router_opt is not None:
        groups.append((router_parameters(model), state.router_opt))
    else:
        frozen = frozen + router_parameters(model)
    stats = _step(model, groups, frozen, x, y, cfg, regularizer, state.program)
    stats["lr"] = state.schedule.get_last_lr()[0]
    state.schedule.step()
    state.step += 1
    return stats


def router_step(model: nn.Module, state: TrainState, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> dict:
    """One step of the router optimizer on a validation batch; experts stay untouched."""
    experts = list(role_parameters(model, EXPERT_ROLES).values())
    return _step(model, [(router_parameters(model), state.router_opt)], experts, x, y, cfg, program=state.program)


def train_local(model: nn.Module, data: UserData, cfg: TrainConfig, state: TrainState | None = None,
                progress: bool = False, regularizer: Regularizer | None = None,
                validate: Callable[[nn.Module], float] | None = None,
                on_step: Callable[[dict], None] | None = None) -> tuple[TrainResult, TrainState]:
    """Run ``cfg.steps`` expert steps with router updates every ``cfg.router_period`` steps (on validation
    batches for ``router_mode="validation"``, fresh training batches for ``"train"``; none for ``"joint"``, where
    routers step with the experts, and ``"fixed"``).

    Args:
        model: a model with adapters (see :func:`device_sdk.inject.inject_adapters`), on ``cfg.device``; batches
            (sampled on the CPU) are moved there.
        data: the user's token streams; training batches come from ``train``, router batches from ``valid``.
        state: optimizers and counters to continue from (``None``: start fresh).
        progress: show a progress bar.
        validate: the validation loss of ``model`` (default: :func:`valid_loss` on ``data.valid`` with the eager
            model; an app that holds only a training program passes its own).
        on_step: called after every expert step with ``{"step", "done", "of", "loss", "lm", "lb", "lr"}`` (an
            app's progress bar); an exception it raises (e.g. :class:`~device_sdk.errors.Cancelled`) stops training
            there, leaving ``model`` and ``state`` as of that step.

    Returns:
        The curves of this call and the state to continue from.

    Raises:
        ConfigError: if the model is not on ``cfg.device``, or backend executorch meets a regularizer.
        TrainProgramError: if the ExecuTorch backend's program does not fit the model or the batches.
        SDKError: if a trainable parameter has no adapter role.
    """
    check_every_trainable_has_a_role(model)
    check_model_device(model, cfg.device)
    state = state or init_train_state(model, cfg)
    validate = validate or (lambda m: valid_loss(m, data.valid, cfg))
    if cfg.backend == "executorch":
        if regularizer is not None:
            raise ConfigError("backend executorch has no regularizer term in its program (HetLoRA's rank "
                              "regulariser); train this strategy with backend pytorch")
        if state.program is None:
            from .backends.executorch import attach_program

            state.program = attach_program(model, cfg)
    result = TrainResult()
    model.train()
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="train", unit="step")
    start = time.perf_counter()
    try:
        for done in steps:
            x, y = sample_batch(data.train, cfg.batch_size, cfg.context, state.generator)  # (B, T) each, CPU int64
            x, y = x.to(cfg.device), y.to(cfg.device)
            stats = expert_step(model, state, x, y, cfg, regularizer)
            result.tokens += x.numel()
            if state.step % cfg.log_every == 0:
                result.train.append({"step": state.step, **stats})
            alternating = cfg.router_mode in ("validation", "train")
            if alternating and state.router_opt is not None and state.step % cfg.router_period == 0:
                source = data.valid if cfg.router_mode == "validation" else data.train
                for _ in range(cfg.router_steps):
                    vx, vy = sample_batch(source, cfg.batch_size, cfg.context, state.generator)
                    vx, vy = vx.to(cfg.device), vy.to(cfg.device)
                    result.router.append({"step": state.step, **router_step(model, state, vx, vy, cfg)})
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                result.valid.append({"step": state.step, "loss": validate(model)})
            if progress:
                steps.set_postfix(loss=f"{stats['lm']:.3f}", lr=f"{stats['lr']:.1e}")
            if on_step is not None:
                on_step({"step": state.step, "done": done + 1, "of": cfg.steps, **stats})
    except BaseException:  # a stop raised by on_step, or any failure: the model leaves trainable and in eval mode
        _set_trainable(list(role_parameters(model, EXPERT_ROLES).values()) + router_parameters(model), True)
        model.eval()
        if progress:
            steps.close()
        raise
    result.seconds = time.perf_counter() - start
    _set_trainable(list(role_parameters(model, EXPERT_ROLES).values()) + router_parameters(model), True)
    if not result.valid or result.valid[-1]["step"] != state.step:
        result.valid.append({"step": state.step, "loss": validate(model)})
    model.eval()
    return result, state


def valid_loss(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig) -> float:
    """Loss on the first ``cfg.eval_batches * cfg.batch_size`` non-overlapping validation windows (fixed set)."""
    max_tokens = cfg.eval_batches * cfg.batch_size * cfg.context
    return evaluate(model, tokens, cfg.context, cfg.batch_size, cfg.precision, max_tokens=max_tokens).loss
