"""LoRA and LoRA-MoE layers: numerical truths on tiny models."""

import pytest
import torch
from torch import nn

from device_sdk.config import AdapterConfig
from device_sdk.inject import inject_adapters, routed_blocks, use_export_form
from device_sdk.lora import LoRALinear, LoRAMoELinear, RoutedMLP, RoutingSlot, dense_gates, top_k_gates
from device_sdk.models import load_base_model
from device_sdk.parts import Role, iter_role_parameters

from ..conftest import make_model

FAMILIES = ["tiny-gpt2", "tiny-llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixing", ["mlp", "projection"])
@pytest.mark.parametrize("n_specialists,routing", [(0, "auto"), (1, "dense"), (3, "sparse"), (3, "dense")])
def test_zero_b_gives_the_base_model(family, mixing, n_specialists, routing):
    x = torch.randint(0, 257, (2, 17))
    reference = load_base_model(family, seed=3).model(input_ids=x).logits
    model = inject_adapters(load_base_model(family, seed=3).model,
                            AdapterConfig(n_specialists=n_specialists, routing=routing, mixing=mixing))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_A"))
    # The projection form adds exact zeros. The mlp form mixes the experts' (equal) hidden states with gates that
    # sum to one, sum_e g_e h = h up to float rounding.
    exact = mixing == "projection" or n_specialists == 0
    tolerance = 0 if exact else 1e-5
    torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=tolerance, atol=tolerance)


def test_one_expert_equals_a_plain_lora_layer():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    plain = LoRALinear(base, rank=4, scale=2.0)
    moe = LoRAMoELinear(base, rank=4, scale=2.0, n_generalists=1, n_specialists=0, slot=RoutingSlot(), sparse=False)
    with torch.no_grad():
        plain.lora.lora_B.normal_()
        moe.experts[0].lora_A.copy_(plain.lora.lora_A)
        moe.experts[0].lora_B.copy_(plain.lora.lora_B)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(moe(x), plain(x))
    assert not torch.allclose(plain(x), base(x))


def test_lora_update_is_scaled_by_alpha_over_sqrt_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 6, bias=False)
    cfg = AdapterConfig(rank=4, alpha=16)
    layer = LoRALinear(base, cfg.rank, cfg.scale)
    with torch.no_grad():
        layer.lora.lora_B.normal_()
    x = torch.randn(2, 6)
    delta = layer.lora.lora_B @ layer.lora.lora_A
    torch.testing.assert_close(layer(x), base(x) + 16 / 4**0.5 * x @ delta.T)


def test_top_k_gates_sum_to_one_and_pick_the_largest_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 5)
    gates, idx = top_k_gates(logits, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 7))
    assert ((gates > 0).sum(-1) == 2).all()
    expected = logits.argsort(dim=-1, descending=True)[..., :2]
    assert torch.equal(idx, expected)
    chosen = logits.gather(-1, idx)
    torch.testing.assert_close(gates.gather(-1, idx), chosen.softmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_routing_equals_dense_routing(family):
    dense = make_model(family, seed=1, n_specialists=3, routing="dense", mixing="projection")
    sparse = make_model(family, seed=1, n_specialists=3, routing="sparse", mixing="projection")
    sparse.load_state_dict(dense.state_dict())
    x = torch.randint(0, 257, (2, 19))
    out_d, out_s = dense(input_ids=x).logits, sparse(input_ids=x).logits
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    out_d.square().mean().backward()
    out_s.square().mean().backward()
    grads_d = {n: p.grad for n, p, _ in iter_role_parameters(dense)}
    for n, p, _ in iter_role_parameters(sparse):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an expert no token was routed to
        torch.testing.assert_close(grad, grads_d[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,attn,mlp_proj", [("tiny-gpt2", 2, 2), ("tiny-llama", 4, 3)])
def test_both_families_inject_with_frozen_shared_base(family, attn, mlp_proj):
    base = load_base_model(family).model
    base_ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    n_base = sum(p.numel() for p in base.parameters())
    model = inject_adapters(base, AdapterConfig(n_specialists=2))
    layers = 2
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == attn * layers
    assert sum(isinstance(m, LoRAMoELinear) for m in model.modules()) == mlp_proj * layers
    assert len(routed_blocks(model)) == layers
    moe = next(m for m in model.modules() if isinstance(m, LoRAMoELinear))
    assert [e.role for e in moe.experts] == [Role.GENERALIST, Role.SPECIALIST, Role.SPECIALIST]
    # the base weights are the same tensors (no per-expert copies) and all frozen
    adapter_ids = {id(p) for _, p, _ in iter_role_parameters(model)}
    base_params = [(n, p) for n, p in model.named_parameters() if id(p) not in adapter_ids]
    assert sum(p.numel() for _, p in base_params) == n_base
    assert not any(p.requires_grad for _, p in base_params)
    assert {p.data_ptr() for _, p in base_params} == set(base_ptrs.values())


def test_every_adapter_parameter_has_exactly_one_role():
    model = make_model("tiny-gpt2", n_specialists=2)
    seen = {}
    for name, p, role in iter_role_parameters(model):
        assert id(p) not in seen
        seen[id(p)] = role
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(seen)
    assert set(seen.values()) == set(Role)


def test_routed_block_without_router_for_a_single_expert():
    model = make_model("tiny-llama", n_specialists=0)
    assert all(b.router is None for b in model.modules() if isinstance(b, RoutedMLP))
    assert not [p for _, p, r in iter_role_parameters(model) if r == Role.ROUTER]


def test_moe_projection_outside_its_block_fails_clearly():
    model = make_model("tiny-llama", n_specialists=1, mixing="projection")
    moe = next(m for m in model.modules() if isinstance(m, LoRAMoELinear))
    with pytest.raises(RuntimeError, match="outside its RoutedMLP"):
        moe(torch.randn(1, 3, 64))


def test_auto_routing_is_dense_until_the_concatenated_rank_gets_large():
    assert not AdapterConfig(n_specialists=3).sparse
    assert not AdapterConfig(n_specialists=31).sparse  # 32 experts x rank 8 = 256
    assert AdapterConfig(n_specialists=32).sparse
    assert AdapterConfig(n_specialists=1, routing="sparse").sparse


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixing", ["mlp", "projection"])
@pytest.mark.parametrize("n_specialists,routing", [(1, "dense"), (3, "dense"), (3, "sparse")])
def test_export_form_computes_the_training_forms_function(family, mixing, n_specialists, routing):
    """Every expert on every token weighted by dense gates (k = E: a plain softmax; k < E: zero outside the top k)
    equals the slot / sparse forms the model trains with."""
    model = make_model(family, seed=2, n_specialists=n_specialists, routing=routing, mixing=mixing).eval()
    x = torch.randint(0, 257, (2, 13))
    with torch.no_grad():
        trained = model(input_ids=x).logits
        gates = [b.gates.clone() for b in routed_blocks(model)]
        exported = use_export_form(model)(input_ids=x).logits
    assert all(b.export_form for b in routed_blocks(model))
    torch.testing.assert_close(exported, trained, rtol=1e-5, atol=1e-5)
    for block, before in zip(routed_blocks(model), gates):
        torch.testing.assert_close(block.gates, before, rtol=1e-6, atol=1e-7)
        assert ((block.gates > 0).sum(-1) == block.k).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dense_gates_are_the_top_k_gates(k):
    logits = torch.randn(5, 7, 4)
    torch.testing.assert_close(dense_gates(logits, k), top_k_gates(logits, k)[0], rtol=1e-6, atol=1e-7)