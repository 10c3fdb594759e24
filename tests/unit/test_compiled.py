"""Training steps through torch.compile, one decoder block at a time (``TrainConfig.compile``): the eager numbers in
both mixing forms, one graph for every block, evaluation and export left eager, copies bound to themselves, and the
settings that cannot use it."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from device_sdk.compiled import compile_blocks, decoder_blocks, is_compiled
from device_sdk.config import AdapterConfig, TrainConfig
from device_sdk.errors import CompileError, ConfigError
from device_sdk.inject import inject_adapters, use_export_form
from device_sdk.models import tiny_model
from device_sdk.parts import iter_role_parameters
from device_sdk.train import expert_step, init_train_state, router_step

from ..conftest import make_model

FAMILIES = ["tiny-gpt2", "tiny-llama"]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _four_blocks(family: str, seed: int, **adapter_kwargs) -> torch.nn.Module:
    """A tiny model with four decoder blocks (enough to see a per-block recompilation), adapters on, LoRA B
    randomised so that every expert contributes."""
    tiny = tiny_model(family)
    tiny.config.num_hidden_layers = 4
    torch.manual_seed(seed)
    model = inject_adapters(type(tiny)(tiny.config), AdapterConfig(**adapter_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model


def _loss_and_grads(model, x):
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=x, use_cache=False).logits.square().mean()  # as training steps run it
    loss.backward()
    return loss.detach(), {n: p.grad for n, p, _ in iter_role_parameters(model) if p.grad is not None}


@pytest.mark.parametrize("mixing", ["mlp", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_match_eager_in_outputs_and_gradients_with_one_graph_for_all_blocks(family, mixing,
                                                                                            fresh_dynamo):
    eager = _four_blocks(family, seed=3, n_specialists=2, routing="dense", mixing=mixing).train()
    compiled = _four_blocks(family, seed=3, n_specialists=2, routing="dense", mixing=mixing).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == len(decoder_blocks(compiled)) == 4
    x = torch.randint(0, 257, (2, 13))
    loss_e, grads_e = _loss_and_grads(eager, x)
    before = _graphs()
    loss_c, grads_c = _loss_and_grads(compiled, x)
    # two graphs for four blocks: the first block's input carries no gradient (the frozen embedding's output), the
    # other three share one graph (dynamo passes each block's parameters in; no per-block recompilation)
    assert _graphs() - before == 2
    _loss_and_grads(compiled, torch.randint(0, 257, (2, 13)))
    assert _graphs() - before == 2  # the next step of the same shape reuses them
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any("router" in n for n in grads_c)
    assert any("attn" in n for n in grads_c)  # the attention LoRAs run inside the compiled blocks too
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation stays eager: no new graph, the same logits
        before = _graphs()
        logits = [m(input_ids=x, use_cache=False).logits for m in (compiled, eager)]
        torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)
        assert _graphs() == before


def test_train_config_compile_reaches_the_model_and_its_expert_and_router_steps(fresh_dynamo):
    cfg = TrainConfig(steps=2, batch_size=2, context=11, precision="fp32", device="cpu", compile=True)
    eager_cfg = TrainConfig(**{**cfg.to_dict(), "compile": False})
    models = [make_model("tiny-llama", seed=5, n_specialists=1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    states = [init_train_state(models[0], eager_cfg), init_train_state(models[1], cfg)]
    flags = [[is_compiled(b) for b in decoder_blocks(m)] for m in models]
    assert flags[0] and not any(flags[0]) and all(flags[1])
    x = torch.randint(0, 257, (2, 12))
    for step in (expert_step, router_step, expert_step):
        stats = [step(m, s, x[:, :-1], x[:, 1:], c) for m, s, c in zip(models, states, (eager_cfg, cfg))]
        assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5)
    assert _graphs() >= 2  # the expert step's graph and the router step's (other parameters need gradients)


def test_compiled_blocks_may_have_more_graphs_than_dynamos_default(fresh_dynamo):
    # users with many expert counts in one process need many graphs; past dynamo's limit the blocks would run eager
    model = make_model("tiny-llama", n_specialists=1).train()
    compile_blocks(model)
    before = _graphs()
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch's undo would hide the setting for good)
        _loss_and_grads(model, torch.randint(0, 257, (1, 7)))
    assert _graphs() - before == 2  # the first block's graph and the second's: one more than the global limit


def test_sparse_blocks_stay_eager_and_compile_can_be_undone():
    assert compile_blocks(make_model("tiny-llama", n_specialists=3, routing="sparse")) == 0
    model = make_model("tiny-llama", n_specialists=1)
    assert compile_blocks(model) > 0
    assert compile_blocks(model) == len(decoder_blocks(model))  # twice is once
    assert compile_blocks(model, enabled=False) == 0
    assert not any(is_compiled(b) for b in decoder_blocks(model)) and not any("forward" in vars(b)
                                                                            for b in decoder_blocks(model))


def test_a_copy_of_a_compiled_model_runs_its_own_blocks_and_export_runs_eager(fresh_dynamo):
    model = make_model("tiny-llama", seed=7, n_specialists=1).train()
    compile_blocks(model)
    clone = copy.deepcopy(model)
    assert all(b.forward.args[0] is b for b in decoder_blocks(clone))
    with torch.no_grad():
        for p in clone.parameters():
            if p.requires_grad:
                p.add_(0.05)
    x = torch.randint(0, 257, (1, 9))
    loss_model, _ = _loss_and_grads(model, x)
    loss_clone, _ = _loss_and_grads(clone, x)
    assert float(loss_clone) != pytest.approx(float(loss_model), rel=1e-4)  # the copy's weights, not the original's
    use_export_form(model)
    assert not any(is_compiled(b) for b in decoder_blocks(model))


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
    compile_blocks(model)
    with pytest.raises(CompileError, match="needs a working C\\+\\+ compiler.*leave --compile off"):
        model(input_ids=torch.randint(0, 257, (1, 7))).logits.sum().backward()
