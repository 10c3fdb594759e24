"""Hardware budget -> specialists, with the memory model calibrated on measured peak RSS."""

import json
from importlib import resources

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from device_sdk.budget import load_memory_model, model_shape, specialists_for_budget
from device_sdk.errors import BudgetError
from device_sdk.models import load_base_model


@pytest.fixture(scope="module")
def smollm2_shape():
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        return model_shape(LlamaForCausalLM(cfg))


def test_shape_of_smollm2(smollm2_shape):
    assert (smollm2_shape.layers, smollm2_shape.d_model, smollm2_shape.d_ff) == (30, 576, 1536)
    assert smollm2_shape.expert_params(8) == 30 * 3 * 8 * (576 + 1536)
    assert 134_000_000 < smollm2_shape.base_params < 135_000_000


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_calibration_reproduces_the_measured_peaks(smollm2_shape, precision):
    calibration = json.loads(resources.files("device_sdk").joinpath("calibration/memory.json").read_text())
    points = calibration["points"][precision]
    assert len(points) >= 6
    model = load_memory_model(precision)
    for p in points:
        predicted = model.predict_mb(smollm2_shape, p["experts"], p["tokens"])
        assert abs(predicted - p["peak_mb"]) <= max(0.1 * p["peak_mb"], 150), p


def test_more_memory_never_means_fewer_specialists(smollm2_shape):
    counts = [specialists_for_budget(smollm2_shape, mb, tokens=1024, precision="bf16").n_specialists
              for mb in range(3150, 3600, 10)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_larger_batches_leave_room_for_fewer_specialists(smollm2_shape):
    small = specialists_for_budget(smollm2_shape, 3300, tokens=256, precision="bf16").n_specialists
    large = specialists_for_budget(smollm2_shape, 3300, tokens=1024, precision="bf16").n_specialists
    assert large < small


def test_a_budget_below_one_expert_fails_with_what_to_do(smollm2_shape):
    with pytest.raises(BudgetError, match=r"raise the budget \(budget_mb, --budget-mb\), or lower the batch") as bf16:
        specialists_for_budget(smollm2_shape, 300, tokens=1024, precision="bf16")
    assert "train in bf16" not in str(bf16.value)  # already bf16: no advice to switch to it
    with pytest.raises(BudgetError, match="or train in bf16 where the CPU has it"):
        specialists_for_budget(smollm2_shape, 300, tokens=1024, precision="fp32")


def test_shape_of_gpt2_family_is_read_from_conv1d_layers():
    shape = model_shape(load_base_model("tiny-gpt2").model)
    assert (shape.layers, shape.d_model, shape.d_ff, shape.vocab) == (2, 64, 256, 257)
    assert shape.mlp_in_out == ((64, 256), (256, 64))


def test_a_time_budget_limits_the_specialists(smollm2_shape):
    model = load_memory_model("bf16")
    if model.s_token is None:
        pytest.skip("calibration has no step times")
    unlimited = specialists_for_budget(smollm2_shape, 100_000, tokens=1024, precision="bf16")
    t1 = model.predict_step_s(smollm2_shape, 2, 1024)
    limited = specialists_for_budget(smollm2_shape, 100_000, tokens=1024, max_step_s=t1 * 1.0001, precision="bf16")
    assert limited.n_specialists == 1 < unlimited.n_specialists
    assert limited.predicted_step_s <= t1 * 1.0001
    with pytest.raises(BudgetError, match="time budget"):
        specialists_for_budget(smollm2_shape, 100_000, tokens=1024, max_step_s=1e-6, precision="bf16")
