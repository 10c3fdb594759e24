"""Bad input fails early with a message that says what was wrong and what to do."""

import pytest
from torch import nn

from device_sdk.config import AdapterConfig, TrainConfig
from device_sdk.errors import ConfigError, InjectionError, ModelNotFoundError
from device_sdk.inject import inject_adapters
from device_sdk.models import load_base_model


def test_unknown_model_names_the_ways_to_get_one(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a built-in name .* --model smollm2-135m"):
        load_base_model("no-such-org/no-such-model-xyz", cache_dir=tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_base_model(str(tmp_path / "folder"), cache_dir=tmp_path)


def test_zero_matched_targets_names_what_was_searched():
    base = load_base_model("tiny-llama").model
    with pytest.raises(InjectionError, match=r"attention targets \['q_lin'\] matched no module"):
        inject_adapters(base, AdapterConfig(attention_targets=("q_lin",)))
    with pytest.raises(InjectionError, match=r"MLP targets \['fc9'\] matched nothing inside 'model.layers.0.mlp'"):
        inject_adapters(load_base_model("tiny-llama").model, AdapterConfig(mlp_targets=("fc9",), mixing="projection"))


def test_unknown_family_without_targets():
    class Odd(nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(InjectionError, match="no default adapter targets for model type 'odd'"):
        inject_adapters(Odd(), AdapterConfig())


def test_injecting_twice_is_refused():
    model = inject_adapters(load_base_model("tiny-gpt2").model, AdapterConfig())
    with pytest.raises(InjectionError, match="already has adapters"):
        inject_adapters(model, AdapterConfig())


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"n_generalists": 0, "n_specialists": 0}, "at least one expert"),
    ({"routing": "fast"}, "routing must be one of"),
    ({"alpha": 0}, "alpha must be > 0"),
])
def test_adapter_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_train_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(steps=0, context=-1, lb_mode="x", precision="fp8")
    text = str(err.value)
    for part in ("steps must be", "context must be", "lb_mode must be", "precision must be"):
        assert part in text
