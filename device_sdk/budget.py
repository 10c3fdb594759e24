"""Hardware budget -> number of specialists.

A memory model predicts the peak RSS of one training step from the base model's size, the batch shape and the
number of experts; its coefficients are fitted to measured peak RSS (``benchmarks/calibrate_memory.py`` writes
``calibration/memory.json``). The device gets the largest specialist count whose prediction fits its budget.

Model (MiB)::

    peak = runtime + base_weights + experts * expert_mb * c_expert + tokens * unit * c_token
    unit = layers * (d_model + d_ff) + vocab            (activation elements per token, up to a constant)
    expert_mb = LoRA-MoE parameters of one expert (all MLP projections) * 16 bytes (param, grad, AdamW m and v)

``c_token`` and ``c_expert`` are fitted per precision; ``runtime`` is the interpreter and library footprint.
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
    """Fitted coefficients of the peak-RSS model (see the module docstring)."""

    runtime_mb: float
    c_token: float
    c_expert: float
    precision: str
    fitted_on: str = "uncalibrated"
    max_abs_error_mb: float | None = None

    def predict_mb(self, shape: ModelShape, n_experts: int, tokens: int, rank: int = 8) -> float:
        """Predicted peak RSS in MiB of training with ``n_experts`` experts and ``tokens`` tokens per step."""
        base = shape.base_params * 4 / MIB
        experts = n_experts * shape.expert_params(rank) * 16 / MIB
        return self.runtime_mb + base + self.c_expert * experts + self.c_token * tokens * shape.unit / MIB


def load_memory_model(precision: str = "bf16") -> MemoryModel:
    """The calibrated memory model for ``precision`` (``fp32`` or ``bf16``)."""
    text = resources.files("device_sdk").joinpath("calibration/memory.json").read_text()
    entry = json.loads(text)["models"][precision]
    return MemoryModel(precision=precision, **entry)


@dataclass(frozen=True)
class BudgetDecision:
    """How many specialists a device runs, and why."""

    n_specialists: int
    predicted_mb: float
    budget_mb: float
    predictions_mb: dict[int, float]


def specialists_for_budget(shape: ModelShape, budget_mb: float, tokens: int, rank: int = 8, n_generalists: int = 1,
                           precision: str = "bf16", memory_model: MemoryModel | None = None,
                           max_specialists: int = MAX_SPECIALISTS) -> BudgetDecision:
    """The largest number of specialists whose predicted peak RSS fits ``budget_mb``.

    Args:
        shape: the base model's shape (:func:`model_shape`).
        budget_mb: memory the device grants to training, in MiB.
        tokens: tokens per step (batch size x context).

    Raises:
        BudgetError: if even the generalists alone do not fit; the message gives the smallest budget that does
            and what to change.
    """
    mm = memory_model or load_memory_model(precision)
    predictions = {s: mm.predict_mb(shape, n_generalists + s, tokens, rank) for s in range(max_specialists + 1)}
    fitting = [s for s, mb in predictions.items() if mb <= budget_mb]
    if not fitting:
        raise BudgetError(
            f"a budget of {budget_mb:.0f} MiB is below the predicted {predictions[0]:.0f} MiB for training with "
            f"{n_generalists} generalist(s) and no specialist at {tokens} tokens per step; raise --budget-mb, lower "
            "--batch or --ctx, or use --precision bf16"
        )
    best = max(fitting)
    log.info("budget %.0f MiB -> %d specialist(s) (predicted peak %.0f MiB)", budget_mb, best, predictions[best])
    return BudgetDecision(best, predictions[best], budget_mb, predictions)
