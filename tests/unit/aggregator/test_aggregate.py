"""Aggregation maths on tiny tensors."""

import pytest
import torch

from aggregator.aggregate import RunningMean, spec_of, validate, weight_for
from aggregator.errors import InvalidUpdate


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(2, 3, generator=g), "a.lora_B": torch.randn(3, 2, generator=g)}


def test_mean_of_identical_inputs_is_the_identity():
    t = _tensors(0)
    mean = RunningMean(spec_of(t))
    for _ in range(5):
        mean.add(t)
    result = mean.result()
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


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.pop("a.lora_B"), "missing key"),
    (lambda t: t.update({"x": torch.zeros(1)}), "unexpected key"),
    (lambda t: t.update({"a.lora_A": torch.zeros(3, 2)}), "shape"),
    (lambda t: t.update({"a.lora_A": torch.zeros(2, 3, dtype=torch.float16)}), "dtype"),
    (lambda t: t["a.lora_A"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
])
def test_invalid_updates_are_rejected_and_not_counted(mutate, message):
    good = _tensors(0)
    mean = RunningMean(spec_of(good))
    mean.add(good)
    bad = {k: v.clone() for k, v in good.items()}
    mutate(bad)
    with pytest.raises(InvalidUpdate, match=message):
        mean.add(bad)
    assert mean.count == 1 and all(torch.equal(mean.result()[k], good[k]) for k in good)


def test_validate_accepts_exact_matches_and_weights_must_be_positive():
    t = _tensors(0)
    validate(t, spec_of(t))
    with pytest.raises(InvalidUpdate, match="positive token count"):
        weight_for("token_weighted", 0)
    with pytest.raises(InvalidUpdate, match="nothing to aggregate"):
        RunningMean(spec_of(t)).result()
