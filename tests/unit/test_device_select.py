"""``device``: ``auto`` -> cuda when available, else cpu; cuda asked for without a GPU is a ConfigError naming the fix;
configs resolve it when built; CPU cache keys are unchanged; training and autocast on the CPU path."""

from pathlib import Path

import numpy as np
import pytest
import torch

from device_sdk import device_select, precision
from device_sdk.config import TrainConfig
from device_sdk.data import UserData
from device_sdk.device_select import check_model_device, model_device, resolve_device, resolve_placement, same_device
from device_sdk.errors import ConfigError
from device_sdk.evaluate import autocast, evaluate
from device_sdk.losses import importance_weights, load_balancing_loss
from device_sdk.sim import SimConfig
from device_sdk.sim import config as sim_config
from device_sdk.train import train_local

from ..conftest import make_model


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A pretend machine with two CUDA devices (only resolution runs; nothing is put on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_auto_is_cpu_without_a_gpu_and_cuda_with_one(no_gpu, monkeypatch):
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_auto_is_cpu_on_this_machine_when_it_has_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu" and TrainConfig().device == "cpu"


@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_naming_the_fix(no_gpu, asked):
    with pytest.raises(ConfigError, match=rf"device '{asked}' was asked for but PyTorch sees no CUDA GPU.*"
                                          r"--device cpu or --device auto.*CUDA build of PyTorch"):
        resolve_device(asked)


def test_cuda_indices_are_checked_against_the_visible_devices(two_gpus):
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == resolve_device("CUDA:01") == resolve_device(torch.device("cuda", 1)) == "cuda:1"
    assert resolve_device(resolve_device("cuda:1")) == "cuda:1"  # a resolved value resolves to itself
    with pytest.raises(ConfigError, match=r"'cuda:2' .* only 2 CUDA device\(s\) are visible \(cuda:0 \.\. cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "mps", ""])
def test_other_values_are_refused_with_the_accepted_forms(two_gpus, bad):
    with pytest.raises(ConfigError, match=r"device must be one of auto, cpu, cuda, cuda:N"):
        resolve_device(bad)


def test_train_config_resolves_the_device_first_and_auto_precision_for_it(two_gpus, monkeypatch):
    cfg = TrainConfig()
    assert (cfg.device, cfg.precision) == ("cuda", "bf16")  # bf16 on a GPU that supports it, whatever the CPU has
    assert TrainConfig(device="cuda:1", precision="fp32").device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert TrainConfig(device="cuda").precision == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert TrainConfig(device="cpu").precision == "bf16"  # the CPU rule on the CPU


def test_train_config_reports_a_bad_device_with_the_other_problems(no_gpu):
    assert TrainConfig(device="auto").device == "cpu"
    with pytest.raises(ConfigError) as err:
        TrainConfig(device="cuda", precision="fp16", steps=0)
    text = str(err.value)
    assert "PyTorch sees no CUDA GPU" in text and "precision must be one of" in text and "steps must be" in text


def test_placement_resolves_the_device_first_and_reports_every_problem(no_gpu, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert resolve_placement("auto", "auto") == ("cpu", "fp32", [])
    device, chosen, problems = resolve_placement("cuda", "auto")  # no device to resolve "auto" precision for
    assert (device, chosen) == ("cuda", "auto") and len(problems) == 1 and "PyTorch sees no CUDA GPU" in problems[0]
    device, chosen, problems = resolve_placement("cuda", "fp16")
    assert len(problems) == 2 and "precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'" in problems[1]
    assert resolve_placement("cpu", "fp16")[2] == ["precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'"]


def test_sim_config_resolves_the_device_when_built(no_gpu, monkeypatch):
    assert SimConfig(data=Path("/srv/data/split")).device == "cpu"
    with pytest.raises(ConfigError, match="invalid simulation settings: device 'cuda' was asked for"):
        SimConfig(data=Path("/srv/data/split"), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cfg = SimConfig(data=Path("/srv/data/split"))
    assert (cfg.device, cfg.precision) == ("cuda", "bf16")


def test_the_cache_key_of_a_cpu_run_is_the_key_without_the_device_field(no_gpu, monkeypatch):
    cfg = SimConfig(data=Path("/srv/data/split"), experts=(4, 2), precision="bf16")
    key = cfg.run_key("comigs-1gxs", 2, ["a", "b"])
    assert SimConfig(data=Path("/srv/data/split"), experts=(4, 2), precision="bf16",
                     device="cpu").run_key("comigs-1gxs", 2, ["a", "b"]) == key
    real_asdict = sim_config.asdict  # the key as it was computed before the setting existed
    monkeypatch.setattr(sim_config, "asdict", lambda c: {k: v for k, v in real_asdict(c).items() if k != "device"})
    assert cfg.run_key("comigs-1gxs", 2, ["a", "b"]) == key


def test_autocast_is_a_cpu_context_on_the_cpu():
    context = autocast("bf16", "cpu")
    assert isinstance(context, torch.autocast) and context.device == "cpu" and context.fast_dtype == torch.bfloat16
    assert isinstance(autocast("bf16", torch.device("cpu")), torch.autocast)
    assert not isinstance(autocast("fp32", "cpu"), torch.autocast)
    with autocast("bf16", "cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


def test_autocast_on_cuda_is_built_for_cuda(two_gpus, monkeypatch):
    built = {}

    class Recorder:
        def __init__(self, device_type, dtype):
            built.update(device_type=device_type, dtype=dtype)

    monkeypatch.setattr(torch, "autocast", Recorder)
    autocast("auto", "cuda:1")
    assert built == {"device_type": "cuda", "dtype": torch.bfloat16}


def test_model_device_and_the_check_that_the_model_lives_where_the_config_says():
    model = make_model("tiny-llama", n_specialists=1)
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")
    check_model_device(model, "cpu")
    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", "cuda")
    assert same_device("cuda:1", torch.device("cuda", 1)) and not same_device("cuda:0", "cuda:1")
    with pytest.raises(ConfigError, match=r"the model is on cpu but its configuration says device='cuda'.*"
                                          r"model.to\('cuda'\)"):
        device_select.check_model_device(model, "cuda")


def test_losses_are_created_on_the_models_device():
    model = make_model("tiny-llama", n_specialists=1)
    assert load_balancing_loss(model, "switch").device == torch.device("cpu")  # no forward pass yet: zero
    assert importance_weights(3, 1, "cpu").device == torch.device("cpu")
    assert torch.allclose(importance_weights(3, 1, "cpu"), importance_weights(3, 1))


def test_train_local_on_the_cpu_device_trains_and_evaluates():
    model = make_model("tiny-llama", n_specialists=1)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 2000).astype(np.uint16) for i in range(3)))
    cfg = TrainConfig(steps=3, batch_size=2, context=16, precision="fp32", device="cpu", router_period=2,
                      router_steps=1)
    result, state = train_local(model, data, cfg)
    assert state.step == 3 and len(result.router) == 1 and np.isfinite(result.valid[-1]["loss"])
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert np.isfinite(evaluate(model, data.test, 16, 2, cfg.precision, max_tokens=64).loss)
