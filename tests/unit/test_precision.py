"""``precision="auto"``: bf16 only where the CPU multiplies bf16 natively."""

import pytest
import torch

from device_sdk import precision
from device_sdk.budget import load_memory_model
from device_sdk.config import TrainConfig
from device_sdk.errors import ConfigError
from device_sdk.evaluate import autocast


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpu_and_explicit_choices_stand(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert precision.resolve_precision("auto") == expected
    assert TrainConfig().precision == expected  # the default, resolved when the config is built
    assert load_memory_model().precision == expected
    assert precision.resolve_precision("fp32") == "fp32" and precision.resolve_precision("bf16") == "bf16"
    assert TrainConfig(precision="bf16").precision == "bf16"
    with autocast("auto"):
        dtype = torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype
    assert dtype == (torch.bfloat16 if native else torch.float32)


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="got 'half'"):
        precision.resolve_precision("half")

