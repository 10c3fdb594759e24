"""Each strategy's aggregation rule and what leaves the device, on tiny tensors and tiny models."""

import pytest
import torch

from device_sdk.errors import ConfigError
from device_sdk.federated import SPECS, InvalidUpload, Upload, fit, mean, spec_for
from device_sdk.federated.rules import RULES, average_delta, svd_factors
from device_sdk.parts import Role, iter_role_parameters
from device_sdk.strategies import ALL, NETWORKED, make_strategy
from device_sdk.strategies.pcl import trust_from_losses
from device_sdk.strategies.ranked import rank_for

from .._tiny import tiny_model_for


def _lora(rank, d_in=6, d_out=5, seed=0, prefix="m"):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_A": torch.randn(rank, d_in, generator=g),
            f"{prefix}.lora_B": torch.randn(d_out, rank, generator=g)}


def _uploads(tensor_dicts, tokens=None, alpha=1.0):
    tokens = tokens or [100] * len(tensor_dicts)
    return [Upload(i, t, n, t["m.lora_A"].shape[0], alpha) for i, (t, n) in enumerate(zip(tensor_dicts, tokens))]


def test_fedavg_of_identical_uploads_is_the_identity_and_of_different_ones_the_mean():
    same = _lora(4)
    out = make_strategy("fedavg").aggregate(_uploads([same, dict(same), dict(same)]))
    assert all(torch.allclose(o[k], same[k]) for o in out for k in same)
    a, b = _lora(4, seed=1), _lora(4, seed=2)
    out = make_strategy("fedavg").aggregate(_uploads([a, b]))
    assert torch.allclose(out[0]["m.lora_A"], (a["m.lora_A"] + b["m.lora_A"]) / 2)
    assert torch.equal(out[0]["m.lora_B"], out[1]["m.lora_B"])


def test_mean_refuses_mismatched_uploads_clearly():
    with pytest.raises(InvalidUpload, match="shape of m.lora_A"):
        mean([_lora(4), _lora(2)])
    with pytest.raises(InvalidUpload, match="disagree on tensor names"):
        mean([_lora(4), _lora(4, prefix="n")])


@pytest.mark.parametrize("name, shared", [
    ("comigs-1g1s", {Role.ATTENTION, Role.GENERALIST}), ("comigs-2s", {Role.ATTENTION}),
    ("comigs-2g", {Role.ATTENTION, Role.GENERALIST}), ("pfedmoe", {Role.ATTENTION, Role.GENERALIST}),
    ("comigs-1gxs", {Role.ATTENTION, Role.GENERALIST}), ("local", set()),
])
def test_only_shared_roles_leave_the_device(name, shared):
    strategy = make_strategy(name)
    model = tiny_model_for(strategy, n_experts=3)
    roles = {n: r for n, _, r in iter_role_parameters(model)}
    sent = strategy.shared_tensors(model)
    assert {roles[n] for n in sent} == shared
    assert not any(roles[n] in (Role.SPECIALIST, Role.ROUTER) for n in sent)  # never specialists or routers
    expected = {n for n, r in roles.items() if r in shared}
    assert set(sent) == expected


def test_ffa_lora_sends_only_b_and_starts_every_device_from_the_same_a():
    strategy = make_strategy("ffa-lora")
    models = [tiny_model_for(strategy, n_experts=2, seed=s) for s in (0, 1)]
    assert all(n.endswith("lora_B") for n in strategy.shared_tensors(models[0]))
    uploads = [Upload(i, strategy.initial_tensors(m), 0, 8, 1.0) for i, m in enumerate(models)]
    first, second = strategy.initial(uploads)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_svd_reproduces_a_rank_r_update_exactly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    for rank in (3, 5):
        a, b = svd_factors(delta, rank, scale=2.0)
        assert a.shape == (rank, 9) and b.shape == (7, rank)
        assert torch.allclose(2.0 * b.double() @ a.double(), delta, atol=1e-5)
    a, b = svd_factors(delta, 2, scale=1.0)  # truncation: the best rank-2 approximation (Eckart-Young)
    s = torch.linalg.svdvals(delta)
    assert torch.linalg.matrix_norm(b.double() @ a.double() - delta) == pytest.approx(float(s[2:].norm()), rel=1e-4)


def test_flexlora_averages_every_clients_update_not_only_the_last():
    ups = _uploads([_lora(2, seed=1), _lora(2, seed=2), _lora(6, seed=3)], tokens=[100, 300, 600], alpha=3.0)
    gamma = [3.0 / 2**0.5, 3.0 / 2**0.5, 3.0 / 6**0.5]  # alpha / sqrt(r) of each device's module (eq. 4)
    assert [u.scale_of("m.lora_A") for u in ups] == pytest.approx(gamma)
    expected = sum(w * g * u.tensors["m.lora_B"].double() @ u.tensors["m.lora_A"].double()
                   for w, g, u in zip((0.1, 0.3, 0.6), gamma, ups))
    assert torch.allclose(average_delta(ups, "m.lora_A", "m.lora_B"), expected)
    out = make_strategy("flexlora-full").aggregate(ups)
    assert [o["m.lora_A"].shape[0] for o in out] == [2, 2, 6]  # every device keeps its own rank
    got = gamma[2] * out[2]["m.lora_B"].double() @ out[2]["m.lora_A"].double()
    assert torch.allclose(got, expected, atol=1e-4)  # rank 6 holds the 5 x 6 average exactly
    last_only = gamma[2] * ups[-1].tensors["m.lora_B"].double() @ ups[-1].tensors["m.lora_A"].double()
    assert not torch.allclose(got, last_only, atol=1e-2)
    small = gamma[0] * out[0]["m.lora_B"].double() @ out[0]["m.lora_A"].double()  # rank 2: the best rank-2 approx.
    tail = float(torch.linalg.svdvals(expected)[2:].norm())
    assert float(torch.linalg.matrix_norm(small - expected)) == pytest.approx(tail, rel=1e-4)


def test_flexlora_devices_rescale_the_scale_free_global_factors_by_their_own_lora_scale():
    ups = _uploads([_lora(2, seed=1), _lora(4, seed=2)])
    ups[1].alpha = 8.0  # gamma = 8 / sqrt(4) = 4
    assert ups[1].scale_of("m.lora_B") == ups[1].scale == 4.0
    strategy = make_strategy("flexlora-full")
    merged = strategy.server_rule(ups)
    assert merged["m.lora_A"].shape == (4, 6) and merged["m.lora_B"].shape == (5, 4)  # the largest rank
    mine = strategy.receive(merged, ups[1])
    assert torch.allclose(4.0 * mine["m.lora_B"] @ mine["m.lora_A"], merged["m.lora_B"] @ merged["m.lora_A"],
                          atol=1e-5)


def test_fit_pads_with_zeros_and_truncates_rank_components():
    a = torch.arange(12.0).reshape(3, 4)
    padded = fit(a, (5, 4))
    assert torch.equal(padded[:3], a) and torch.equal(padded[3:], torch.zeros(2, 4))
    assert torch.equal(fit(a, (2, 4)), a[:2])
    b = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(fit(b, (2, 1)), b[:, :1])


def test_hetlora_pads_to_the_largest_rank_weights_by_update_norm_and_truncates_back():
    small, large = _lora(2, seed=1), _lora(4, seed=2)
    ups = _uploads([small, large])
    strategy = make_strategy("hetlora-full")
    out = strategy.aggregate(ups)
    norms = [u.scale_of("m.lora_A") * float(torch.linalg.matrix_norm(u.tensors["m.lora_B"] @ u.tensors["m.lora_A"]))
             for u in ups]  # ||gamma_i B_i A_i||, gamma_i = alpha / sqrt(r_i)
    w = [n / sum(norms) for n in norms]
    merged_a = w[0] * fit(small["m.lora_A"], (4, 6)) + w[1] * large["m.lora_A"]
    merged_b = w[0] * fit(small["m.lora_B"], (5, 4)) + w[1] * large["m.lora_B"]
    assert torch.allclose(out[1]["m.lora_A"], merged_a, atol=1e-6)
    assert torch.allclose(out[1]["m.lora_B"], merged_b, atol=1e-6)
    assert out[0]["m.lora_A"].shape == (2, 6) and torch.allclose(out[0]["m.lora_A"], merged_a[:2], atol=1e-6)
    assert torch.allclose(out[0]["m.lora_B"], merged_b[:, :2], atol=1e-6)


def test_hetlora_ranks_match_comigs_parameter_counts():
    assert [rank_for(n, "full") for n in (4, 2, 2, 2)] == [32, 16, 16, 16]
    assert [rank_for(n, "active") for n in (4, 2, 1)] == [16, 16, 8]


def test_hetlora_prunes_a_shrinking_tail_and_zeroes_it():
    strategy = make_strategy("hetlora-active")
    model = tiny_model_for(strategy, n_experts=2)
    with torch.no_grad():
        for name, p, _ in iter_role_parameters(model):
            p.normal_()
    strategy.begin_round(0, model)
    with torch.no_grad():  # training that shrank the tail components
        for name, p, _ in iter_role_parameters(model):
            if name.endswith("lora_A"):
                p[15:] *= 0.5
    strategy.end_round(0, model)
    assert strategy.state["active_rank"]["0"] == 15
    mlp_a = [p for n, p, r in iter_role_parameters(model) if n.endswith("lora_A") and r == Role.GENERALIST]
    attention_a = [p for n, p, r in iter_role_parameters(model) if n.endswith("lora_A") and r == Role.ATTENTION]
    assert all(p.shape[0] == 16 and float(p[15:].detach().abs().max()) == 0 for p in mlp_a)
    assert all(p.shape[0] == 8 and bool((p != 0).all()) for p in attention_a)  # the attention LoRA is never pruned
    reg = strategy.regularizer(0)(model)
    assert reg.requires_grad


def test_pcl_trust_is_row_stochastic_and_favours_models_that_fit_own_data():
    losses = torch.tensor([[2.0, 3.0, 3.0], [3.0, 2.0, 2.05], [3.0, 3.0, 3.0]])
    trust = trust_from_losses(losses, temperature=0.1)
    assert torch.allclose(trust.sum(dim=1), torch.ones(3))
    assert trust[0, 0] > 0.99  # own model clearly best: near-identity row
    assert trust[2, 0] == pytest.approx(1 / 3)  # indifferent user: uniform row
    ups = _uploads([_lora(2, seed=1), _lora(2, seed=2), _lora(2, seed=3)])
    table = losses.tolist()

    def owner(tensors):  # which upload a peer model came from (the server relays them unchanged)
        return next(u.user for u in ups if torch.equal(u.tensors["m.lora_A"], tensors["m.lora_A"]))

    strategy = make_strategy("pcl")
    out = strategy.aggregate(ups, peer_loss=lambda i, tensors: table[i][owner(tensors)])
    expected = sum(float(trust[1, j]) * ups[j].tensors["m.lora_A"] for j in range(3))
    assert torch.allclose(out[1]["m.lora_A"], expected, atol=1e-6)
    assert strategy.state["trust"]["1"][0] == pytest.approx(trust[1].tolist())
    with pytest.raises(ConfigError, match="validation loss"):
        make_strategy("pcl").aggregate(ups)


def test_every_listed_strategy_builds_and_unknown_names_are_refused():
    assert len(ALL) == len(set(ALL)) == 19
    for name in ALL:
        assert make_strategy(name).name == name
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'"):
        make_strategy("fedprox")


@pytest.mark.parametrize("joint,train,validation", [("local-moe", "local-moe-tr", "comigs-2s"),
                                                     ("fedavg-moe", "fedavg-moe-tr", "comigs-2g"),
                                                     ("pfedmoe", "comigs-tr", "comigs-1g1s")])
def test_table4_ablations_differ_from_comigs_only_in_how_routers_learn(joint, train, validation):
    strategies = [make_strategy(n) for n in (joint, train, validation)]
    assert [s.router_mode for s in strategies] == ["joint", "train", "validation"]
    assert len({s.adapter_config(0, 2) for s in strategies}) == 1  # the same experts
    assert all(Role.ROUTER not in s.shared_roles for s in strategies)  # routers never leave the device
    if joint == "local-moe":  # Local-MoE shares nothing at all; CoMiGS-2S still averages the attention LoRA
        assert not strategies[0].shared_roles and not strategies[1].shared_roles
        assert strategies[2].shared_roles == {Role.ATTENTION, Role.GENERALIST}
    else:
        assert len({s.shared_roles for s in strategies}) == 1


def test_every_strategy_names_its_server_rule_in_the_catalog():
    """The device side (Strategy) and the server side (StrategySpec) agree, and the rule is a federated function."""
    assert set(SPECS) == set(ALL)
    for name in ALL:
        strategy = make_strategy(name)
        assert strategy.spec is spec_for(name) and strategy.server_rule_name in RULES
        assert strategy.collaborative == (name in NETWORKED)
    assert spec_for("ffa-lora").plain_mean and not spec_for("ffa-lora").travels("m.lora_A")
    assert [spec_for(n).rule for n in ("pcl", "hetlora-full", "flexlora-active")] == ["pcl_relay", "hetlora",
                                                                                      "flexlora"]
    with pytest.raises(ConfigError, match="unknown strategy 'fedprox'"):
        spec_for("fedprox")


def test_server_rule_is_the_federated_rule_of_its_name():
    ups = _uploads([_lora(4, seed=1), _lora(4, seed=2)], tokens=[100, 300])
    for name in ("fedavg", "hetlora-full", "flexlora-full", "pcl"):
        strategy = make_strategy(name)
        ours, theirs = strategy.server_rule(ups), RULES[strategy.server_rule_name](ups)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
