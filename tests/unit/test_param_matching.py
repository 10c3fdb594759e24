"""HetLoRA / FlexLoRA matched to CoMiGS-1GXS's parameters as in the paper (section 4.3.1) and the authors' code:
only the MLP LoRA's rank follows a device's budget, the attention LoRA stays at the expert rank 8; and a round of
devices with different ranks gives the same tensors in-process and through the aggregator's rules."""

from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from aggregator.blobs import to_bytes
from aggregator.errors import InvalidUpdate
from aggregator.schemas import Capabilities, FederationConfig
from aggregator.service import Federation
from aggregator.store import Store
from device_sdk.config import AdapterConfig
from device_sdk.errors import ConfigError
from device_sdk.inject import adapter_config, inject_adapters
from device_sdk.lora import LoRALinear, LoRAMoELinear
from device_sdk.parts import Role, count_parameters, iter_role_parameters
from device_sdk.strategies import make_strategy
from device_sdk.strategies.base import device_upload

from .._tiny import tiny_model_for

EXPERTS = (4, 2, 2, 2)  # the paper's CoMiGS-1GXS devices (Table 2)
BASELINES = ("hetlora-full", "hetlora-active", "flexlora-full", "flexlora-active")


@cache
def smollm2_counts(name: str, n_experts: int) -> dict[str, int]:
    """Adapter parameters per role of a SmolLM2-135M device (30 blocks, hidden 576, MLP 1536, 9 heads / 3 kv heads;
    the vocabulary does not matter) under strategy ``name``, built on the meta device (no memory, no init time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    strategy = make_strategy(name)
    with torch.device("meta"):
        model = inject_adapters(LlamaForCausalLM(cfg), strategy.adapter_config(0, n_experts))
    ranks = {name: p.shape[0] for name, p, role in iter_role_parameters(model)
             if role == Role.ATTENTION and name.endswith("lora_A")}
    assert len(ranks) == 30 * 4 and set(ranks.values()) == {8}  # q, k, v, o LoRA of rank 8 in every block
    counts = count_parameters(model)
    counts.pop("base")
    return counts


def test_only_the_mlp_rank_follows_the_budget():
    for name in BASELINES:
        strategy = make_strategy(name)
        ranks = [strategy.adapter_config(0, n).rank for n in EXPERTS]
        assert ranks == ([32, 16, 16, 16] if name.endswith("full") else [16, 16, 16, 16])
        assert {strategy.adapter_config(0, n).attention_lora_rank for n in (1, *EXPERTS)} == {8}
    assert make_strategy("comigs-1gxs").adapter_config(0, 4).attention_lora_rank == 8


def test_smollm2_baselines_match_comigs_1gxs_expert_parameters_exactly():
    """Per device: ``full`` LoRA = all of CoMiGS's experts, ``active`` = its top-2 experts; attention equal."""
    per_expert = 30 * 8 * ((576 + 1536) * 2 + (1536 + 576))  # gate, up (576 -> 1536), down (1536 -> 576), rank 8
    attention = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))  # q, o (576 -> 576), k, v (576 -> 192), rank 8
    for n in EXPERTS:
        comigs = smollm2_counts("comigs-1gxs", n)
        assert comigs["generalist"] + comigs["specialist"] == n * per_expert
        assert comigs["attention"] == attention and comigs["router"] == 30 * 576 * n
        for name in BASELINES:
            baseline = smollm2_counts(name, n)
            experts = n if name.endswith("full") else min(2, n)
            assert baseline == {"attention": attention, "generalist": experts * per_expert, "specialist": 0,
                                "router": 0}
    full = sum(sum(smollm2_counts("hetlora-full", n).values()) for n in EXPERTS)
    comigs = sum(sum(smollm2_counts("comigs-1gxs", n).values()) for n in EXPERTS)
    routers = sum(smollm2_counts("comigs-1gxs", n)["router"] for n in EXPERTS)
    assert (full, comigs, routers) == (18_892_800, 19_065_600, 172_800)  # full = CoMiGS - its routers
    active = sum(sum(smollm2_counts("flexlora-active", n).values()) for n in EXPERTS)
    assert active == 4 * attention + 4 * 2 * per_expert == 15_851_520


def test_every_lora_is_scaled_by_alpha_over_the_root_of_its_own_rank():
    model = tiny_model_for(make_strategy("hetlora-full"), n_experts=4)
    cfg = adapter_config(model)
    assert (cfg.rank, cfg.attention_rank) == (32, 8)
    assert (cfg.scale, cfg.attention_scale) == (16 / 32**0.5, 16 / 8**0.5)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear | LoRAMoELinear)]
    assert {(type(m), m.scale) for m in layers} == {(LoRALinear, cfg.attention_scale), (LoRAMoELinear, cfg.scale)}
    assert AdapterConfig(rank=16).attention_scale == AdapterConfig(rank=16).scale  # unset: the expert rank


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "8"])
def test_attention_rank_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="attention_rank must be a positive integer or None"):
        AdapterConfig(attention_rank=value)


def _devices(name: str) -> tuple:
    """Three tiny-llama devices with 4, 2 and 1 experts (``full``: MLP ranks 32, 16, 8), random LoRA values."""
    strategy = make_strategy(name)
    models = [tiny_model_for(strategy, n_experts=n, seed=i + 1, user=i) for i, n in enumerate((4, 2, 1))]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in models:
            for _, p, _ in iter_role_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return strategy, models


def _through_the_aggregator(tmp_path, name: str, models: list, tokens: list[int]) -> dict[str, torch.Tensor]:
    """One round through the aggregator's own rules (enrollment, per-rank upload checks, the strategy's server rule
    over uploads read back from its store): the global version it publishes."""
    strategy = make_strategy(name)
    fed = Federation(Store(tmp_path))
    fed.create(FederationConfig(base_model="tiny-llama", strategy=name, min_devices=len(models)), "secret-secret-0123456789ab")
    initial = max((strategy.initial_tensors(m) for m in models), key=lambda t: sum(v.numel() for v in t.values()))
    fed.set_initial(to_bytes(initial))
    with pytest.raises(InvalidUpdate, match="exceeds the federation's largest rank 32"):
        fed.enroll("secret-secret-0123456789ab", "too big", Capabilities(n_specialists=0, rank=40))
    for i, (model, n) in enumerate(zip(models, tokens)):
        _, token = fed.enroll("secret-secret-0123456789ab", f"d{i}", Capabilities(n_specialists=0, rank=adapter_config(model).rank))
        fed.upload(fed.authenticate(token), 1, to_bytes(strategy.shared_tensors(model), {"tokens": str(n)}))
    assert fed.maybe_close() == 1
    return load_file(str(fed.store.global_blob(1)[0]))


@pytest.mark.parametrize("name", ["hetlora-full", "flexlora-full"])
def test_a_round_across_ranks_is_the_same_in_process_and_through_the_aggregator(tmp_path, name):
    strategy, models = _devices(name)
    if name.startswith("hetlora"):  # device 1 (MLP rank 16) pruned its MLP LoRA to rank 15 in an earlier round
        strategy.begin_round(1, models[1])
        with torch.no_grad():
            for n, p, role in iter_role_parameters(models[1]):
                if role == Role.GENERALIST and n.endswith("lora_A"):
                    p[15:] *= 0.5
        strategy.end_round(1, models[1])
        assert strategy.state["active_rank"]["1"] == 15
    tokens = [100, 300, 600]
    uploads = [device_upload(i, m, strategy.shared_tensors(m), n) for i, (m, n) in enumerate(zip(models, tokens))]
    in_process = strategy.aggregate(uploads)

    published = _through_the_aggregator(tmp_path, name, models, tokens)
    assert all(torch.equal(published[k], v) for k, v in strategy.server_rule(uploads).items())
    received = [strategy.receive(published, u) for u in uploads]
    for mine, theirs, u in zip(in_process, received, uploads):
        assert mine.keys() == theirs.keys() == u.tensors.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].shape == u.tensors[k].shape for k in mine)

    roles = uploads[0].roles
    attention = [k for k in published if roles[k] == Role.ATTENTION and k.endswith("lora_A")]
    mlp = [k for k in published if roles[k] == Role.GENERALIST and k.endswith("lora_A")]
    assert {published[k].shape[0] for k in attention} == {8} and {published[k].shape[0] for k in mlp} == {32}
    assert [{theirs[k].shape[0] for k in mlp} for theirs in received] == [{32}, {16}, {8}]
    assert all(theirs[k].shape[0] == 8 for theirs in received for k in attention)
    a_key = attention[0]
    b_key = a_key[: -len("lora_A")] + "lora_B"
    if name.startswith("hetlora"):  # the pruned device: MLP zero beyond rank 15, attention kept whole
        assert all(float(received[1][k][15:].abs().max()) == 0 for k in mlp)
        assert torch.equal(received[1][a_key], published[a_key]) and bool((published[a_key] != 0).all())
    else:  # every module with its own scale: the attention update (rank 8 everywhere) is held exactly
        gamma = 16.0 / 8**0.5
        for theirs in received:
            torch.testing.assert_close(gamma * theirs[b_key] @ theirs[a_key], published[b_key] @ published[a_key])
