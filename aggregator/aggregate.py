"""Aggregation maths: pure functions over ``{name: tensor}`` dicts. No model code, no I/O.

Tensors are validated against the federation's spec (exact key set, shapes, dtypes, finite values) before they
count. The mean is a streaming weighted sum in float64, so memory does not grow with the number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import InvalidUpdate

#: Aggregation rules a federation can use.
RULES = ("mean", "token_weighted")


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one shared tensor."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(tuple(data["shape"]), data["dtype"])


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec a set of tensors defines (used for the federation's initial global tensors)."""
    return {name: TensorSpec(tuple(t.shape), dtype_name(t)) for name, t in sorted(tensors.items())}


def validate(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> None:
    """Check that ``tensors`` match ``spec`` exactly and hold only finite values.

    Raises:
        InvalidUpdate: listing the problems (at most a few of each kind).
    """
    problems = []
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s), e.g. {extra[:3]}")
    for name in sorted(set(spec) & set(tensors)):
        t, s = tensors[name], spec[name]
        if tuple(t.shape) != s.shape:
            problems.append(f"{name}: shape {list(t.shape)}, expected {list(s.shape)}")
        elif dtype_name(t) != s.dtype:
            problems.append(f"{name}: dtype {dtype_name(t)}, expected {s.dtype}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: contains NaN or Inf")
        if len(problems) >= 8:
            break
    if problems:
        raise InvalidUpdate("update does not match the federation: " + "; ".join(problems),
                            problems=problems)


class RunningMean:
    """Weighted mean of tensor dicts accumulated one at a time (float64 sums, results in the spec's dtype)."""

    def __init__(self, spec: Mapping[str, TensorSpec]) -> None:
        self.spec = dict(spec)
        self.sums = {name: torch.zeros(s.shape, dtype=torch.float64) for name, s in self.spec.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0, check_values: bool = True) -> None:
        """Add one update with ``weight`` (> 0).

        Args:
            check_values: run the full :func:`validate` (shapes, dtypes, finite values). Updates the store accepted
                were validated on upload; re-reading them only needs the key set checked.
        """
        if not weight > 0:
            raise InvalidUpdate(f"aggregation weight must be > 0, got {weight}")
        if check_values:
            validate(tensors, self.spec)
        elif tensors.keys() != self.spec.keys():
            raise InvalidUpdate("a stored update does not have the federation's key set")
        for name, t in tensors.items():
            self.sums[name].add_(t, alpha=weight)  # float32 into float64, no intermediate copy
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean, cast to each tensor's dtype."""
        if self.count == 0:
            raise InvalidUpdate("nothing to aggregate: no update was added")
        return {name: (s / self.total_weight).to(getattr(torch, self.spec[name].dtype))
                for name, s in self.sums.items()}


def weight_for(rule: str, tokens: int) -> float:
    """Aggregation weight of one update under ``rule`` (uniform mean as in the paper, or by training tokens)."""
    if rule == "mean":
        return 1.0
    if rule == "token_weighted":
        if tokens <= 0:
            raise InvalidUpdate(f"token-weighted aggregation needs a positive token count, got {tokens}")
        return float(tokens)
    raise InvalidUpdate(f"unknown aggregation rule {rule!r}; choose from {RULES}")
