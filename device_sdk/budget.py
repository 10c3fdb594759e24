"""Hardware budget -> number of specialists.

A budget model predicts the peak RSS (and, optionally, the time) of one training step from the base model's
size, the batch shape and the number of experts; its coefficients are fitted to measurements of the real base
model (``benchmarks/calibrate_memory.py`` writes ``calibration/memory.json``). The device gets the largest
specialist count whose predictions fit its budget.

Memory (MiB)::

    peak = runtime + base_weights + experts * expert_mb * c_expert + tokens * unit * c_token
    unit = layers * (d_model + d_ff) + vocab            (activation elements per token, up to a constant)
    expert_mb = LoRA-MoE parameters of one expert (all MLP projections) * 16 bytes (param, grad, AdamW m and v)

Time (seconds per expert step, on the calibration machine)::

    step = (s_step + tokens * (s_token + experts * s_expert_token)) * (base_params / calibrated base_params)

``c_token``, ``c_expert``, ``s_step``, ``s_token`` and ``s_expert_token`` are fitted per precision; ``runtime`` is the
interpreter and library footprint. Time depends on the processor: calibrate on the device class you target.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources

from torch import nn

from .config import AdapterConfig
from .errors import BudgetError
from .inject import family_spec
from .precision import resolve_precision

log = logging.getLogger(__name__)

MIB = 2**20
MAX_SPECIALISTS = 15


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a base model."""

    base_params: int
    layers: int
    d_model: int
    d_ff: int
    vocab: int
    mlp_in_out: tuple[tuple[int, int], ...]  # (D_in, D_out) of each LoRA-MoE projection in one block

    @property
    def unit(self) -> int:
        return self.layers * (self.d_model + self.d_ff) + self.vocab

    def expert_params(self, rank: int) -> int:
        """Parameters of one expert across all MLP blocks."""
        return self.layers * sum(rank * (i + o) for i, o in self.mlp_in_out)


def model_shape(model: nn.Module, cfg: AdapterConfig | None = None) -> ModelShape:
    """Read the shape of a Hugging Face causal LM (without adapters) for the memory model."""
    from .lora import linear_dims

    cfg = cfg or AdapterConfig()
    spec = family_spec(model, cfg)
    c = model.config
    mlp_names = [n for n, _ in model.named_modules() if n == spec.mlp_module or n.endswith("." + spec.mlp_module)]
    mlp = model.get_submodule(mlp_names[0])
    dims = tuple(linear_dims(m) for n, m in mlp.named_modules()
                 if n and any(n == t or n.endswith("." + t) for t in spec.mlp_targets))
    d_model = dims[0][0]
    d_ff = max(max(i, o) for i, o in dims)
    return ModelShape(
        base_params=sum(p.numel() for p in model.parameters()), layers=len(mlp_names), d_model=d_model, d_ff=d_ff,
        vocab=int(getattr(c, "vocab_size", 0)), mlp_in_out=dims,
    )


@dataclass(frozen=True)
class MemoryModel:
    """Fitted coefficients of the peak-RSS and step-time models (see the module docstring)."""

    runtime_mb: float
    c_token: float
    c_expert: float
    precision: str
    s_step: float = 0.0
    s_token: float | None = None
    s_expert_token: float | None = None
    calibrated_base_params: int | None = None
    fitted_on: str = "uncalibrated"
    max_abs_error_mb: float | None = None

    def predict_mb(self, shape: ModelShape, n_experts: int, tokens: int, rank: int = 8) -> float:
        """Predicted peak RSS in MiB of training with ``n_experts`` experts and ``tokens`` tokens per step."""
        base = shape.base_params * 4 / MIB
        experts = n_experts * shape.expert_params(rank) * 16 / MIB
        return self.runtime_mb + base + self.c_expert * experts + self.c_token * tokens * shape.unit / MIB

    def predict_step_s(self, shape: ModelShape, n_experts: int, tokens: int) -> float | None:
        """Predicted seconds per expert step on the calibration machine (``None`` if time is not calibrated)."""
        if self.s_token is None or self.s_expert_token is None:
            return None
        size = shape.base_params / (self.calibrated_base_params or shape.base_params)
        return (self.s_step + tokens * (self.s_token + n_experts * self.s_expert_token)) * size


def load_memory_model(precision: str = "auto") -> MemoryModel:
    """The calibrated budget model for ``precision`` (``fp32``, ``bf16``, or ``auto``: what this CPU trains in)."""
    precision = resolve_precision(precision)
    text = resources.files("device_sdk").joinpath("calibration/memory.json").read_text()
    data = json.loads(text)
    entry = data["models"][precision]
    fields = {k: v for k, v in entry.items() if k in MemoryModel.__dataclass_fields__}
    return MemoryModel(precision=precision, calibrated_base_params=data.get("base_params"), **fields)


@dataclass(frozen=True)
class BudgetDecision:
    """How many specialists a device runs, and why."""

    n_specialists: int
    predicted_mb: float
    budget_mb: float
    predictions_mb: dict[int, float]
    predicted_step_s: float | None = None


def specialists_for_budget(shape: ModelShape, budget_mb: float, tokens: int, rank: int = 8, n_generalists: int = 1,
                           precision: str = "auto", memory_model: MemoryModel | None = None,
                           max_specialists: int = MAX_SPECIALISTS,
                           max_step_s: float | None = None) -> BudgetDecision:
    """The largest number of specialists whose predicted peak RSS fits ``budget_mb`` (and whose predicted step
    time fits ``max_step_s``, if given).

    Args:
        shape: the base model's shape (:func:`model_shape`).
        budget_mb: memory the device grants to training, in MiB.
        tokens: tokens per step (batch size x context).
        max_step_s: seconds the device grants to one expert step (``None``: no time limit).

    Raises:
        BudgetError: if even the generalists alone do not fit; the message says what to change.
    """
    mm = memory_model or load_memory_model(precision)
    predictions = {s: mm.predict_mb(shape, n_generalists + s, tokens, rank) for s in range(max_specialists + 1)}
    times = {s: mm.predict_step_s(shape, n_generalists + s, tokens) for s in predictions}
    fitting = [s for s, mb in predictions.items() if mb <= budget_mb]
    if not fitting:
        bf16 = "" if precision == "bf16" else ", or train in bf16 where the CPU has it (precision bf16)"
        raise BudgetError(
            f"a budget of {budget_mb:.0f} MiB is below the predicted {predictions[0]:.0f} MiB for training with "
            f"{n_generalists} generalist(s) and no specialist at {tokens} tokens per step; raise the budget "
            f"(budget_mb, --budget-mb), or lower the batch size or context (--batch, --ctx){bf16}"
        )
    if max_step_s is not None:
        if times[0] is None:
            raise BudgetError("the budget model has no step-time calibration; run benchmarks/calibrate_memory.py "
                              "or drop the time budget")
        fitting = [s for s in fitting if times[s] <= max_step_s]
        if not fitting:
            raise BudgetError(
                f"a time budget of {max_step_s:.2f} s per step is below the predicted {times[0]:.2f} s with no "
                f"specialist at {tokens} tokens per step; raise the time budget or lower --batch or --ctx"
            )
    best = max(fitting)
    log.info("budget %.0f MiB%s -> %d specialist(s) (predicted peak %.0f MiB, step %s s)", budget_mb,
             "" if max_step_s is None else f", {max_step_s:.2f} s/step", best, predictions[best], times[best])
    return BudgetDecision(best, predictions[best], budget_mb, predictions, times[best])
