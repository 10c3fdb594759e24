"""Whole-MLP experts (mixing="mlp"): the block equals E self-contained LoRA MLPs mixed by the router's gates."""

import copy

import pytest
import torch
from torch import nn

from device_sdk.config import AdapterConfig
from device_sdk.inject import inject_adapters, routed_blocks
from device_sdk.lora import LoRAMoELinear, top_k_gates
from device_sdk.models import load_base_model
from device_sdk.parts import iter_role_parameters

from ..conftest import make_model

FAMILIES = ["tiny-gpt2", "tiny-llama"]


class NaiveLoRA(nn.Module):
    """A deep copy of a frozen projection with one expert's LoRA: ``base(x) + s B A x``."""

    def __init__(self, projection: LoRAMoELinear, expert: int) -> None:
        super().__init__()
        self.base = copy.deepcopy(projection.base)
        self.a = projection.experts[expert].lora_A.detach().clone()
        self.b = projection.experts[expert].lora_B.detach().clone()
        self.scale = projection.scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def naive_block(block, x: torch.Tensor) -> torch.Tensor:
    """Reference: E deep copies of the MLP, each with its own expert's LoRAs, outputs mixed by the top-k gates."""
    gates, _ = top_k_gates(block.router(x), block.k)  # (B, T, E)
    out = torch.zeros_like(x)
    for e in range(block.n_experts):
        mlp = copy.deepcopy(block.mlp)
        for name, module in list(mlp.named_children()):
            if isinstance(module, LoRAMoELinear):
                setattr(mlp, name, NaiveLoRA(module, e))
        out = out + gates[..., e : e + 1] * mlp(x)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_specialists,routing", [(1, "dense"), (3, "dense"), (3, "sparse"), (2, "sparse")])
def test_block_equals_a_mixture_of_whole_lora_mlps(family, n_specialists, routing):
    model = make_model(family, seed=2, n_specialists=n_specialists, routing=routing).eval()
    x = torch.randn(2, 9, model.config.hidden_size)
    for block in routed_blocks(model):
        with torch.no_grad():
            block.router.weight.normal_()  # spread tokens over all experts
        torch.testing.assert_close(block(x), naive_block(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_mixing_differs_from_projection_mixing(family):
    mlp = make_model(family, seed=4, n_specialists=1, mixing="mlp")
    proj = make_model(family, seed=4, n_specialists=1, mixing="projection")
    proj.load_state_dict(mlp.state_dict())
    x = torch.randint(0, 257, (2, 11))
    assert not torch.allclose(mlp(input_ids=x).logits, proj(input_ids=x).logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_expert_model_equals_plain_lora(family):
    """With one expert there is no router, and both mixing forms are the plain LoRA model."""
    mlp = make_model(family, seed=5, n_generalists=1, n_specialists=0, mixing="mlp")
    proj = make_model(family, seed=5, n_generalists=1, n_specialists=0, mixing="projection")
    proj.load_state_dict(mlp.state_dict())
    x = torch.randint(0, 257, (2, 11))
    torch.testing.assert_close(mlp(input_ids=x).logits, proj(input_ids=x).logits, rtol=0, atol=0)
    block = routed_blocks(mlp)[0]
    assert block.router is None
    y = torch.randn(1, 5, mlp.config.hidden_size)
    torch.testing.assert_close(block(y), naive_single(block, y), rtol=1e-5, atol=1e-5)


def naive_single(block, x):
    mlp = copy.deepcopy(block.mlp)
    for name, module in list(mlp.named_children()):
        if isinstance(module, LoRAMoELinear):
            setattr(mlp, name, NaiveLoRA(module, 0))
    return mlp(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_and_dense_mlp_mixing_agree_in_outputs_and_gradients(family):
    dense = make_model(family, seed=1, n_specialists=3, routing="dense")
    sparse = make_model(family, seed=1, n_specialists=3, routing="sparse")
    sparse.load_state_dict(dense.state_dict())
    x = torch.randint(0, 257, (2, 19))
    out_d, out_s = dense(input_ids=x).logits, sparse(input_ids=x).logits
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    out_d.square().mean().backward()
    out_s.square().mean().backward()
    grads_d = {n: p.grad for n, p, _ in iter_role_parameters(dense)}
    for n, p, _ in iter_role_parameters(sparse):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad, grads_d[n], rtol=1e-4, atol=1e-6)


def test_mlp_mixing_refuses_partial_targets_and_unknown_families():
    base = load_base_model("tiny-llama", seed=0).model
    with pytest.raises(Exception, match="every MLP projection"):
        inject_adapters(base, AdapterConfig(mlp_targets=("up_proj", "down_proj")))
    base = load_base_model("tiny-llama", seed=0).model  # projection mixing takes any subset
    inject_adapters(base, AdapterConfig(mlp_targets=("up_proj", "down_proj"), mixing="projection"))
    with pytest.raises(Exception, match="mixing must be one of"):
        AdapterConfig(mixing="block")
