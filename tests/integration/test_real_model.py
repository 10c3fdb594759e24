"""Checks on the real SmolLM2-135M base model (installed from PyPI by the setup); marked slow."""

import copy
import math

import pytest
import torch

from device_sdk.config import AdapterConfig, TrainConfig
from device_sdk.data import load_user_data
from device_sdk.evaluate import evaluate
from device_sdk.inject import inject_adapters
from device_sdk.models import load_base_model
from device_sdk.train import init_train_state, expert_step, objective

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m")


def test_smollm2_loads_as_a_pretrained_llama(smollm2):
    cfg = smollm2.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    text = "The quick brown fox jumps over the lazy dog."
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(text)) == text


@pytest.mark.shared_data
def test_adapters_start_at_the_base_model_and_learn_a_user(smollm2, shared_data, tmp_path):
    data = load_user_data(shared_data / "multilingual" / "nl", smollm2.tokenizer, cache_dir=tmp_path)
    x = torch.from_numpy(data.test[:65].astype("int64"))[None]
    with torch.no_grad():
        base_logits = smollm2.model(input_ids=x).logits
    base_eval = evaluate(smollm2.model, data.test, context=128, max_tokens=4096)
    assert 5 < base_eval.perplexity < 500  # a pretrained model, not a random one (~50,000)

    # Zero B matrices: the projection form adds exact zeros; the whole-MLP form mixes the experts' (equal) hidden
    # states by gates that sum to 1 only to rounding, so its logits move by float noise (~1e-5 of logits ~10).
    projection = inject_adapters(copy.deepcopy(smollm2.model), AdapterConfig(n_specialists=1, mixing="projection"))
    with torch.no_grad():
        torch.testing.assert_close(projection(input_ids=x).logits, base_logits, rtol=0, atol=0)
    model = inject_adapters(smollm2.model, AdapterConfig(n_specialists=1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base_logits, rtol=0, atol=2e-4)
    cfg = TrainConfig(steps=8, batch_size=4, context=64)  # precision auto: what this CPU trains in
    state = init_train_state(model, cfg)
    xb = torch.from_numpy(data.train[:4 * 65].astype("int64")).view(4, 65)
    before = objective(model, xb[:, :-1], xb[:, 1:], cfg)[1].item()
    for _ in range(8):
        expert_step(model, state, xb[:, :-1], xb[:, 1:], cfg)
    after = objective(model, xb[:, :-1], xb[:, 1:], cfg)[1].item()
    assert math.isfinite(after) and after < before - 0.2
