"""The aggregator's glue around the federated rules: refusals become InvalidUpdate (HTTP 422), a round's running
mean counts each device once, a non-finite global is not published. The maths: tests/unit/test_federated.py."""

import pytest
import torch

from aggregator.aggregate import RoundMean, check_finite, spec_of, validate, weight_for
from aggregator.errors import AggregationFailed, InvalidUpdate
from device_sdk.federated import mean

from ..test_federated import INVALID, _tensors


@pytest.mark.parametrize("mutate,message", INVALID)
def test_invalid_updates_are_refused_as_invalid_update_with_their_problems(mutate, message):
    good = _tensors(0)
    bad = {k: v.clone() for k, v in good.items()}
    mutate(bad)
    with pytest.raises(InvalidUpdate, match=message) as caught:
        validate(bad, spec_of(good))
    assert caught.value.status == 422 and any(message in p for p in caught.value.details["problems"])


def test_validate_accepts_exact_matches_and_weights_must_be_positive():
    t = _tensors(0)
    validate(t, spec_of(t))
    assert weight_for("mean", 0) == 1.0 and weight_for("token_weighted", 7) == 7.0
    with pytest.raises(InvalidUpdate, match="positive token count"):
        weight_for("token_weighted", 0)
    with pytest.raises(InvalidUpdate, match="unknown aggregation rule"):
        weight_for("median", 1)


def test_a_round_mean_counts_each_device_once_and_equals_the_federated_mean():
    a, b = _tensors(1), _tensors(2)
    running = RoundMean(1, spec_of(a))
    assert running.add(7, a, 1.0) and running.add(8, b, 1.0)
    assert not running.add(7, b, 1.0)  # a device already counted
    result = running.mean.result()
    assert running.members == {7, 8}
    assert all(torch.equal(result[k], mean([a, b])[k]) for k in a)  # bit-identical to the simulation's mean
    with pytest.raises(InvalidUpdate, match="key set"):
        running.add(9, {"a.lora_A": a["a.lora_A"]}, 1.0)


def test_a_non_finite_global_is_not_published():
    check_finite(_tensors(0))
    with pytest.raises(AggregationFailed, match="NaN or Inf values in 1 tensor"):
        check_finite({**_tensors(0), "x": torch.tensor([float("nan")])})
