"""Tiny models shaped by a strategy (shared by strategy and simulation tests)."""

from __future__ import annotations

import torch

from device_sdk.inject import inject_adapters
from device_sdk.models import load_base_model


def tiny_model_for(strategy, n_experts: int = 2, seed: int = 0, user: int = 0):
    base = load_base_model("tiny-llama", seed=0).model
    torch.manual_seed(seed)
    model = inject_adapters(base, strategy.adapter_config(user, n_experts))
    strategy.prepare(user, model)
    return model
