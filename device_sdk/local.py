"""A single-device personalisation run: load, pick the specialist count, evaluate, train, evaluate, save."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapters import save_adapters
from .budget import model_shape, specialists_for_budget
from .config import AdapterConfig, TrainConfig
from .data import load_user_data
from .device_select import device_name
from .errors import ConfigError
from .evaluate import evaluate
from .inject import inject_adapters
from .memory import peak_rss_mb, reset_peak_rss
from .models import default_cache_dir, load_base_model
from .parts import count_parameters
from .plots import plot_learning_curves
from .train import train_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRunConfig:
    """A ``train-local`` run.

    Attributes:
        specialists_from_budget: choose ``adapter.n_specialists`` from ``budget_mb`` (or 1 without a budget).
        eval_tokens: evaluate on N test tokens in windows spread over the test set (``None``: the whole test set).
    """

    data: Path
    model: str
    out: Path
    adapter: AdapterConfig
    train: TrainConfig
    specialists_from_budget: bool = False
    budget_mb: float | None = None
    budget_step_s: float | None = None
    eval_tokens: int | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.budget_mb is not None and self.budget_mb <= 0:
            problems.append(f"budget_mb must be > 0, got {self.budget_mb}")
        if self.budget_step_s is not None and (self.budget_step_s <= 0 or self.budget_mb is None):
            problems.append("budget_step_s must be > 0 and goes with budget_mb")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            problems.append(f"eval_tokens must be >= 1, got {self.eval_tokens}")
        if problems:
            raise ConfigError("invalid LocalRunConfig: " + "; ".join(problems))


def run_local(run: LocalRunConfig, progress: bool = False) -> dict:
    """Personalise ``run.model`` on the user folder ``run.data``; returns (and writes) the metrics.

    Writes ``out/adapters/*.safetensors``, ``out/metrics.json`` and ``out/curves.png``. The model trains and
    evaluates on ``run.train.device`` (resolved when the :class:`TrainConfig` was built).

    Args:
        run: the run's settings.
        progress: show progress bars.

    Returns:
        The metrics written to ``metrics.json``.
    """
    cache = run.cache_dir or default_cache_dir()
    base = load_base_model(run.model, cache_dir=cache)
    adapter = run.adapter
    budget = None
    if run.specialists_from_budget:
        if run.budget_mb is None:
            adapter = replace(adapter, n_specialists=1)
        else:
            if run.train.device != "cpu":
                log.warning("the memory budget model is calibrated for CPU training; on %s it predicts host "
                            "memory, not GPU memory", run.train.device)
            tokens = run.train.batch_size * run.train.context
            budget = specialists_for_budget(model_shape(base.model, adapter), run.budget_mb, tokens, adapter.rank,
                                            adapter.n_generalists, run.train.precision,
                                            max_step_s=run.budget_step_s)
            adapter = replace(adapter, n_specialists=budget.n_specialists)
    data = load_user_data(run.data, base.tokenizer, cache_dir=cache)
    torch.manual_seed(run.train.seed)
    model = inject_adapters(base.model, adapter).to(run.train.device)  # adapters initialised on the CPU
    log.info("user %s: %d/%d/%d train/valid/test tokens; %d generalist(s), %d specialist(s); parameters %s",
             data.name, len(data.train), len(data.valid), len(data.test), adapter.n_generalists,
             adapter.n_specialists, count_parameters(model))

    eval_args = dict(context=run.train.context, batch_size=max(run.train.batch_size, 8),
                     precision=run.train.precision, max_tokens=run.eval_tokens, spread=True, progress=progress)
    before = evaluate(model, data.test, **eval_args)
    log.info("test perplexity before: %.3f", before.perplexity)
    reset_peak_rss()
    result, state = train_local(model, data, run.train, progress=progress)
    train_peak = peak_rss_mb()
    after = evaluate(model, data.test, **eval_args)
    log.info("test perplexity after: %.3f", after.perplexity)

    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    save_adapters(model, out / "adapters", base.name)
    metrics = {
        "user": data.name,
        "model": base.name,
        "model_source": base.source,
        "adapter": adapter.to_dict(),
        "train_config": {k: v for k, v in run.train.to_dict().items() if k != "extra"},
        "budget": None if budget is None else {"budget_mb": budget.budget_mb, "predicted_mb": budget.predicted_mb,
                                               "budget_step_s": run.budget_step_s,
                                               "predicted_step_s": budget.predicted_step_s},
        "parameters": count_parameters(model),
        "tokens": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "test": {
            "before": {"loss": before.loss, "perplexity": before.perplexity, "tokens": before.tokens},
            "after": {"loss": after.loss, "perplexity": after.perplexity, "tokens": after.tokens},
        },
        "train": {"tokens": result.tokens, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                  "curve": result.train, "router_curve": result.router, "valid_curve": result.valid},
        "peak_rss_mb": train_peak,
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                 "torch": torch.__version__, "device": run.train.device,
                 "device_name": device_name(run.train.device)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_learning_curves(result.train, result.valid, result.router, out / "curves.png",
                         title=f"{data.name}: {base.name}, {adapter.n_generalists}G{adapter.n_specialists}S")
    return metrics
