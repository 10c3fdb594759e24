"""The federated rules (device_sdk.federated) on tiny tensors: validation, the one mean, the catalog's shapes,
and that every rule maps identical uploads to themselves."""

import json

import pytest
import torch

from device_sdk.federated import (ALL, NETWORKED, SPECS, InvalidUpload, RunningMean, Upload, common_start, lora_scale,
                                  mean, networked_spec, spec_of, validate, weight_for)
from device_sdk.federated import wire
from device_sdk.federated.rules import RULES, bundle, unbundle


def _tensors(seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(rank, 3, generator=g), "a.lora_B": torch.randn(3, rank, generator=g)}


def test_mean_of_identical_inputs_is_the_identity():
    t = _tensors(0)
    running = RunningMean(spec_of(t))
    for _ in range(5):
        running.add(t)
    result = running.result()
    assert all(torch.equal(result[k], t[k]) for k in t)


def test_uniform_and_token_weighted_means():
    a, b = _tensors(1), _tensors(2)
    uniform = RunningMean(spec_of(a))
    uniform.add(a, weight_for("mean", 10))
    uniform.add(b, weight_for("mean", 30))
    weighted = RunningMean(spec_of(a))
    weighted.add(a, weight_for("token_weighted", 10))
    weighted.add(b, weight_for("token_weighted", 30))
    for k in a:
        expected = ((a[k].double() + b[k].double()) / 2).float()
        assert torch.equal(uniform.result()[k], expected)
        torch.testing.assert_close(weighted.result()[k], (0.25 * a[k].double() + 0.75 * b[k].double()).float())


def test_the_mean_function_and_the_streaming_mean_are_one_arithmetic():
    dicts = [_tensors(s) for s in range(5)]
    for weights in (None, [3.0, 1.0, 4.0, 1.0, 5.0]):
        running = RunningMean(spec_of(dicts[0]))
        for i, d in enumerate(dicts):
            running.add(d, 1.0 if weights is None else weights[i])
        streamed, at_once = running.result(), mean(dicts, weights)
        assert all(torch.equal(streamed[k], at_once[k]) for k in streamed)
    ups = [Upload(i, d, 10 * (i + 1), 2, 16.0) for i, d in enumerate(dicts)]
    by_tokens = RULES["token_weighted"](ups)
    assert all(torch.equal(by_tokens[k], mean(dicts, [10.0 * (i + 1) for i in range(5)])[k]) for k in by_tokens)


#: Ways an upload can miss its spec, with the words the refusal names it by.
INVALID = [
    (lambda t: t.pop("a.lora_B"), "missing key"),
    (lambda t: t.update({"x": torch.zeros(1)}), "unexpected key"),
    (lambda t: t.update({"a.lora_A": torch.zeros(3, 2)}), "shape"),
    (lambda t: t.update({"a.lora_A": torch.zeros(2, 3, dtype=torch.float16)}), "dtype"),
    (lambda t: t["a.lora_A"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
]


@pytest.mark.parametrize("mutate,message", INVALID)
def test_invalid_updates_are_rejected_and_not_counted(mutate, message):
    good = _tensors(0)
    running = RunningMean(spec_of(good))
    running.add(good)
    bad = {k: v.clone() for k, v in good.items()}
    mutate(bad)
    with pytest.raises(InvalidUpload, match=message):
        running.add(bad)
    assert running.count == 1 and all(torch.equal(running.result()[k], good[k]) for k in good)


def test_validate_bounds_values_and_weights_must_be_positive():
    t = _tensors(0)
    validate(t, spec_of(t))
    with pytest.raises(InvalidUpload, match="exceeds the federation's bound max_abs_value=0.001") as refused:
        validate(t, spec_of(t), max_abs=1e-3)
    assert len(refused.value.problems) == len(t) > 1  # every tensor named, the advice given once
    assert str(refused.value).count("larger max_abs_value") == 1
    with pytest.raises(InvalidUpload, match="positive token count"):
        weight_for("token_weighted", 0)
    with pytest.raises(InvalidUpload, match="nothing to aggregate"):
        RunningMean(spec_of(t)).result()
    with pytest.raises(InvalidUpload, match="must be > 0"):
        RunningMean(spec_of(t)).add(t, 0.0)


@pytest.mark.parametrize("rule", sorted(set(RULES) - {"pcl_relay"}))
def test_every_merging_rule_maps_identical_uploads_to_themselves(rule):
    t = _tensors(3, rank=4)
    merged = RULES[rule]([Upload(i, dict(t), 100, 4, 16.0) for i in range(3)])
    assert all(torch.allclose(merged[k], t[k], atol=1e-5) or rule == "flexlora" for k in t)
    if rule == "flexlora":  # the factors change, their product (scale 1 on the server) is the update
        gamma = lora_scale(16.0, 4)
        assert torch.allclose(merged["a.lora_B"] @ merged["a.lora_A"], gamma * t["a.lora_B"] @ t["a.lora_A"],
                              atol=1e-4)


def test_pcl_relay_bundles_every_upload_and_unbundles_in_order():
    ups = [Upload(i, _tensors(i), 0, 2, 1.0) for i in range(3)]
    peers = unbundle(bundle(ups))
    assert [set(p) for p in peers] == [set(ups[0].tensors)] * 3
    assert all(torch.equal(p[k], u.tensors[k]) for p, u in zip(peers, ups) for k in p)
    with pytest.raises(InvalidUpload, match="peer<j>"):
        unbundle({"a.lora_A": torch.zeros(1)})


def test_the_catalog_says_what_travels_and_at_which_shapes():
    shapes = {"att.lora_A": (8, 6), "att.lora_B": (5, 8), "mlp.lora_A": (32, 6), "mlp.lora_B": (5, 32)}
    assert networked_spec("comigs-1gxs").upload_shapes(shapes, 8) == shapes  # one rank for every device
    assert networked_spec("ffa-lora").upload_shapes(shapes, 8) == {"att.lora_B": (5, 8), "mlp.lora_B": (5, 32)}
    assert networked_spec("hetlora-full").upload_shapes(shapes, 16) == {
        "att.lora_A": (8, 6), "att.lora_B": (5, 8), "mlp.lora_A": (16, 6), "mlp.lora_B": (5, 16)}
    assert set(SPECS) == set(ALL) and "local" not in NETWORKED and "centralized" not in NETWORKED
    with pytest.raises(Exception, match="shares nothing"):
        networked_spec("local")


def test_common_start_gives_every_device_the_largest_tensor_cut_to_its_shape():
    small, large = _tensors(1, rank=2), _tensors(2, rank=4)
    starts = common_start([Upload(0, small, 0, 2, 1.0), Upload(1, large, 0, 4, 1.0)])
    assert torch.equal(starts[1]["a.lora_A"], large["a.lora_A"])
    assert torch.equal(starts[0]["a.lora_A"], large["a.lora_A"][:2]) and starts[0]["a.lora_B"].shape == (3, 2)


def test_an_upload_round_trips_through_its_wire_format_and_bad_bytes_or_numbers_are_refused():
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)}
    data = wire.encode_upload(tensors, 1234, {"valid_loss": 2.5, "note": "text is ignored"})
    back, metadata = wire.decode(data)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert wire.read_metadata(metadata) == (1234, {"valid_loss": 2.5})
    with pytest.raises(InvalidUpload, match="not a valid safetensors"):
        wire.decode(data[: len(data) // 2])
    for bad in ({"tokens": "-1"}, {"tokens": str(2**53)}, {"tokens": "1e3"}, {"metrics": '{"loss": NaN}'},
                {"metrics": '{"loss": 1e400}'}, {"metrics": "[1, 2]"},
                {"metrics": json.dumps({f"m{i}": 1.0 for i in range(wire.MAX_METRICS + 1)})}):
        with pytest.raises(InvalidUpload):
            wire.read_metadata(bad)
