"""The bi-level update: separation of expert and router steps, gradients, load balancing, learning."""

import copy

import numpy as np
import pytest
import torch

from device_sdk.config import TrainConfig
from device_sdk.data import UserData, load_user_data
from device_sdk.losses import block_balance_loss, importance_weights, load_balancing_loss
from device_sdk.parts import EXPERT_ROLES, Role, role_parameters
from device_sdk.train import (expert_step, init_train_state, objective, router_step, train_local, valid_loss)

from ..conftest import make_model


def _snapshot(model, roles):
    return {n: p.detach().clone() for n, p in role_parameters(model, roles).items()}


def _batch(seed, b=4, t=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 257, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


CFG = TrainConfig(steps=10, batch_size=4, context=16, precision="fp32", lr_experts=1e-2, lr_router=1e-2)


@pytest.mark.parametrize("n_specialists", [1, 3])
def test_expert_step_leaves_routers_bit_identical(n_specialists):
    model = make_model("tiny-llama", n_specialists=n_specialists)
    state = init_train_state(model, CFG)
    routers, experts = _snapshot(model, Role.ROUTER), _snapshot(model, EXPERT_ROLES)
    for i in range(3):
        expert_step(model, state, *_batch(i), CFG)
    for n, p in role_parameters(model, Role.ROUTER).items():
        assert torch.equal(p, routers[n]), n
        assert p.grad is None
    assert any(not torch.equal(p, experts[n]) for n, p in role_parameters(model, EXPERT_ROLES).items())


@pytest.mark.parametrize("n_specialists", [1, 3])
def test_router_step_leaves_experts_bit_identical(n_specialists):
    model = make_model("tiny-gpt2", n_specialists=n_specialists)
    state = init_train_state(model, CFG)
    expert_step(model, state, *_batch(0), CFG)
    routers, experts = _snapshot(model, Role.ROUTER), _snapshot(model, EXPERT_ROLES)
    adapter_ids = {id(p) for p in role_parameters(model, set(Role)).values()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapter_ids}
    router_step(model, state, *_batch(1), CFG)
    for n, p in role_parameters(model, EXPERT_ROLES).items():
        assert torch.equal(p, experts[n]), n
        assert p.grad is None
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n])
    assert all(not torch.equal(p, routers[n]) for n, p in role_parameters(model, Role.ROUTER).items())


def test_router_gradients_come_only_from_the_validation_batch():
    model = make_model("tiny-llama", n_specialists=2)
    state = init_train_state(model, CFG)
    for i in range(3):  # training batches: their router gradients must not survive into the router step
        expert_step(model, state, *_batch(i), CFG)
    vx, vy = _batch(100)
    fresh = copy.deepcopy(model)
    router_step(model, state, vx, vy, CFG)
    fresh_routers = role_parameters(fresh, Role.ROUTER)
    for p in fresh.parameters():
        p.requires_grad_(False)
    for p in fresh_routers.values():
        p.requires_grad_(True)
    total, _, _ = objective(fresh, vx, vy, CFG)
    expected = torch.autograd.grad(total, list(fresh_routers.values()))
    for (name, p), g in zip(role_parameters(model, Role.ROUTER).items(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8, msg=name)


def test_load_balancing_loss_has_a_gradient_with_two_experts_and_top2():
    model = make_model("tiny-llama", n_specialists=1)  # 2 experts, k = 2: every token uses both
    with torch.no_grad():  # unbalanced routers, as after some training
        for p in role_parameters(model, Role.ROUTER).values():
            p.normal_(std=0.5)
    model(input_ids=_batch(0)[0])
    lb = load_balancing_loss(model)
    grads = torch.autograd.grad(lb, list(role_parameters(model, Role.ROUTER).values()))
    assert all(g.abs().sum() > 0 for g in grads)
    # a loss counting top-2 memberships would be a constant here: f_j = 1 for both experts
    block = next(m for m in model.modules() if getattr(m, "router_probs", None) is not None)
    counts = (block.gates > 0).float()
    assert torch.equal(counts, torch.ones_like(counts))


def test_balance_loss_is_one_when_balanced_and_larger_otherwise():
    probs = torch.full((10, 4), 0.25)
    gates = torch.full((10, 4), 0.25)
    assert block_balance_loss(probs, gates, torch.ones(4)).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(10, 1)
    assert block_balance_loss(skewed, skewed, torch.ones(4)).item() > 1.0


def test_importance_weighting_favours_the_generalist_as_in_eq5():
    n = 4
    w = importance_weights(n, n_generalists=1)
    assert torch.equal(importance_weights(2, 1), torch.ones(2))  # eq. 5 reduces to Switch for 2 experts
    logits = torch.zeros(1, n, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(2000):
        probs = logits.softmax(-1)
        loss = block_balance_loss(probs, probs, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = logits.softmax(-1).detach()[0]
    assert p[0].item() == pytest.approx(0.5, abs=0.01)
    assert p[1:].tolist() == pytest.approx([1 / 6] * 3, abs=0.01)


def test_router_updates_happen_every_tau_steps():
    model = make_model("tiny-llama", n_specialists=1)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 5000).astype(np.uint16) for i in range(3)))
    cfg = TrainConfig(steps=7, batch_size=2, context=16, precision="fp32", router_period=3, router_steps=2,
                      schedule_steps=14)
    result, state = train_local(model, data, cfg)
    assert [r["step"] for r in result.router] == [3, 3, 6, 6]
    assert state.step == 7
    result2, state = train_local(model, data, cfg, state=state)  # tau counts across calls (rounds)
    assert [r["step"] for r in result2.router] == [9, 9, 12, 12]


def test_one_cycle_cosine_schedule_warms_up_then_decays():
    from device_sdk.train import one_cycle_cosine

    values = [one_cycle_cosine(s, 100, 0.1) for s in range(101)]
    assert values[0] < 0.1 and values[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(1e-3) and one_cycle_cosine(500, 100, 0.1) == pytest.approx(1e-3)
    assert one_cycle_cosine(0, 2, 0.1) < one_cycle_cosine(1, 2, 0.1)  # short schedules work too


def test_bf16_autocast_trains_and_keeps_adapters_fp32():
    model = make_model("tiny-gpt2", n_specialists=1)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 5000).astype(np.uint16) for i in range(3)))
    cfg = TrainConfig(steps=3, batch_size=2, context=16, precision="bf16", router_period=2, router_steps=1)
    result, _ = train_local(model, data, cfg)
    assert all(np.isfinite(r["loss"]) for r in result.train)
    assert all(p.dtype == torch.float32 for p in role_parameters(model, set(Role)).values())


@pytest.mark.shared_data
@pytest.mark.parametrize("family,n_specialists", [("tiny-gpt2", 1), ("tiny-llama", 3)])
def test_training_on_real_text_lowers_validation_loss(shared_data, tmp_path, family, n_specialists):
    from device_sdk.tokenizer import ByteTokenizer

    data = load_user_data(shared_data / "multilingual" / "nl", ByteTokenizer(), cache_dir=tmp_path)
    model = make_model(family, n_specialists=n_specialists)
    cfg = TrainConfig(steps=40, batch_size=8, context=64, precision="fp32", router_period=10, router_steps=2,
                      eval_batches=4)
    before = valid_loss(model, data.valid, cfg)
    result, _ = train_local(model, data, cfg)
    after = result.valid[-1]["loss"]
    assert after < before - 0.1, (before, after)


def test_joint_router_mode_moves_routers_on_training_batches():
    model = make_model(n_specialists=1)
    cfg = TrainConfig(steps=1, batch_size=4, context=16, precision="fp32", lr_router=1e-2, router_mode="joint")
    state = init_train_state(model, cfg)
    routers, experts = _snapshot(model, Role.ROUTER), _snapshot(model, EXPERT_ROLES)
    expert_step(model, state, *_batch(0), cfg)
    assert all(not torch.equal(p, routers[n]) for n, p in role_parameters(model, Role.ROUTER).items())
    assert any(not torch.equal(p, experts[n]) for n, p in role_parameters(model, EXPERT_ROLES).items())


def test_fixed_router_mode_never_trains_routers_and_zero_routers_gate_uniformly():
    model = make_model(n_specialists=1)
    with torch.no_grad():
        for p in role_parameters(model, Role.ROUTER).values():
            p.zero_()
    cfg = TrainConfig(steps=4, batch_size=4, context=16, precision="fp32", router_mode="fixed", router_period=1,
                      lb_weight=0.0)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 400) for i in range(3)))
    result, state = train_local(model, data, cfg)
    assert state.router_opt is None and not result.router
    assert all(float(p.abs().max()) == 0 for p in role_parameters(model, Role.ROUTER).values())
    model(input_ids=_batch(1)[0])
    from device_sdk.inject import routed_blocks

    gates = routed_blocks(model)[0].gates
    assert torch.allclose(gates, torch.full_like(gates, 0.5))


def test_freeze_lora_a_keeps_every_a_and_trains_every_b():
    model = make_model(n_specialists=1)
    cfg = TrainConfig(steps=3, batch_size=4, context=16, precision="fp32", freeze_lora_a=True, router_period=2,
                      router_steps=1)
    before = _snapshot(model, EXPERT_ROLES)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 400) for i in range(3)))
    train_local(model, data, cfg)
    after = _snapshot(model, EXPERT_ROLES)
    assert all(torch.equal(after[n], before[n]) for n in before if n.endswith("lora_A"))
    assert all(not torch.equal(after[n], before[n]) for n in before if n.endswith("lora_B"))


def test_train_router_mode_samples_router_batches_from_training_data(monkeypatch):
    import device_sdk.train as train_module

    seen = []
    real = train_module.sample_batch
    monkeypatch.setattr(train_module, "sample_batch", lambda tokens, *a: seen.append(tokens) or real(tokens, *a))
    model = make_model(n_specialists=1)
    cfg = TrainConfig(steps=2, batch_size=4, context=16, precision="fp32", router_mode="train", router_period=1,
                      router_steps=1)
    data = UserData("u", *(np.random.default_rng(i).integers(0, 257, 400) for i in range(3)))
    result, _ = train_local(model, data, cfg)
    assert len(result.router) == 2 and len(seen) == 4
    assert all(tokens is data.train for tokens in seen)


def test_loss_with_scores_other_tensors_and_restores_the_models_own():
    from device_sdk.evaluate import evaluate, loss_with

    model = make_model(n_generalists=1, n_specialists=1)
    stream = np.random.default_rng(0).integers(0, 200, size=400)
    own = {k: p.detach().clone() for k, p in model.named_parameters() if k.endswith("lora_B")}
    other = {k: torch.randn_like(t) for k, t in own.items()}
    before = evaluate(model, stream, 32).loss
    swapped = loss_with(model, other, stream, 32)
    assert swapped != before
    assert all(torch.equal(model.get_parameter(k), t) for k, t in own.items())  # restored
    assert evaluate(model, stream, 32).loss == before
    with pytest.raises(KeyError, match="not parameters of the model"):
        loss_with(model, {"nope": torch.zeros(1)}, stream, 32)
