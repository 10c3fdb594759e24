"""The compiled form of the whole-MLP mixture (``TrainConfig.compile``): the eager numbers, one graph for every block,
evaluation left eager, and the settings that cannot use it."""

import pytest
import torch
from torch._dynamo.utils import counters

from device_sdk.config import TrainConfig
from device_sdk.errors import CompileError, ConfigError
from device_sdk.inject import routed_blocks
from device_sdk.mixture import compile_mixtures, compiled_slot_mix
from device_sdk.parts import iter_role_parameters
from device_sdk.train import expert_step, init_train_state

from ..conftest import make_model

FAMILIES = ["tiny-gpt2", "tiny-llama"]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    compiled_slot_mix.cache_clear()
    yield
    torch._dynamo.reset()
    compiled_slot_mix.cache_clear()


def _loss_and_grads(model, x):
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=x).logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p, _ in iter_role_parameters(model) if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_mix_matches_eager_in_outputs_and_gradients_with_one_graph_for_all_blocks(family, fresh_dynamo):
    eager = make_model(family, seed=3, n_specialists=2, routing="dense").train()
    compiled = make_model(family, seed=3, n_specialists=2, routing="dense").train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_mixtures(compiled) == compiled.config.num_hidden_layers >= 2
    x = torch.randint(0, 257, (2, 13))
    loss_e, grads_e = _loss_and_grads(eager, x)
    before = _graphs()
    loss_c, grads_c = _loss_and_grads(compiled, x)
    assert _graphs() - before == 1  # compiled at all, and once for every block (no per-layer recompilation)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any("router" in n for n in grads_c)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation stays eager: no new graph, the same logits
        before = _graphs()
        torch.testing.assert_close(compiled(input_ids=x).logits, eager(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        assert _graphs() == before


def test_train_config_compile_reaches_the_model_and_its_expert_steps(fresh_dynamo):
    cfg = TrainConfig(steps=2, batch_size=2, context=11, precision="fp32", device="cpu", compile=True)
    eager_cfg = TrainConfig(**{**cfg.to_dict(), "compile": False})
    models = [make_model("tiny-llama", seed=5, n_specialists=1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    states = [init_train_state(models[0], eager_cfg), init_train_state(models[1], cfg)]
    flags = [[b._experts.compiled for b in routed_blocks(m)] for m in models]
    assert flags[0] and not any(flags[0]) and all(flags[1])
    x = torch.randint(0, 257, (2, 12))
    for _ in range(2):
        stats = [expert_step(m, s, x[:, :-1], x[:, 1:], c) for m, s, c in zip(models, states, (eager_cfg, cfg))]
        assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5)
    assert _graphs() >= 1


def test_only_dense_whole_mlp_mixtures_compile_and_compile_can_be_undone():
    assert compile_mixtures(make_model("tiny-llama", n_specialists=3, routing="sparse")) == 0
    assert compile_mixtures(make_model("tiny-llama", n_specialists=1, mixing="projection")) == 0
    model = make_model("tiny-llama", n_specialists=1)
    assert compile_mixtures(model) > 0
    assert compile_mixtures(model, enabled=False) == 0
    assert not any(b._experts.compiled for b in routed_blocks(model))


def test_compile_setting_is_checked():
    with pytest.raises(ConfigError, match="compile must be True or False"):
        TrainConfig(compile="yes")
    with pytest.raises(ConfigError, match="backend pytorch"):
        TrainConfig(compile=True, backend="executorch")


def test_a_missing_cxx_compiler_is_a_clear_error(fresh_dynamo, monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "force_disable_caches", True)  # a cached graph would need no compiler
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    model = make_model("tiny-llama", n_specialists=1).train()
    compile_mixtures(model)
    with pytest.raises(CompileError, match="needs a working C\\+\\+ compiler.*leave --compile off"):
        model(input_ids=torch.randint(0, 257, (1, 7))).logits.sum().backward()
