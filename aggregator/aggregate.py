"""Aggregation maths: pure functions over ``{name: tensor}`` dicts. No model code, no I/O.

Tensors are validated against the federation's spec (exact key set, shapes, dtypes, finite values within the
federation's magnitude bound) before they count. The mean is a streaming weighted sum in float64, so memory does not
grow with the number of devices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import AggregationFailed, InvalidUpdate

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


def _abs_max(t: torch.Tensor) -> float:
    """The largest ``|x|`` of a floating-point tensor; NaN if it holds a NaN, inf if it holds an Inf (0 if empty)."""
    if t.numel() == 0:
        return 0.0
    low, high = (float(x) for x in torch.aminmax(t))  # one pass, no temporary; NaN propagates
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def validate(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec],
             max_abs: float | None = None) -> None:
    """Check that ``tensors`` match ``spec`` exactly and hold only finite values (of magnitude at most ``max_abs``).

    Args:
        max_abs: the largest ``|x|`` accepted (the federation's ``max_abs_value``); ``None``: any finite value.

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
        elif t.is_floating_point():
            largest = _abs_max(t)
            if not math.isfinite(largest):
                problems.append(f"{name}: contains NaN or Inf")
            elif max_abs is not None and largest > max_abs:
                problems.append(f"{name}: a value of magnitude {largest:.3g} exceeds the federation's bound "
                                f"max_abs_value={max_abs:g}; check the device's training (diverged?) or create the "
                                "federation with a larger max_abs_value")
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


class RoundMean:
    """The running (weighted) mean of one open round's accepted uploads; each device counts once.

    Float64 sums of float32 values are exact unless their magnitudes span more than ~2^28, so the arrival order of
    the uploads does not change the float32 result the re-read mean gives.
    """

    def __init__(self, number: int, spec: Mapping[str, TensorSpec]) -> None:
        self.round = number
        self.mean = RunningMean(spec)
        self.members: set[int] = set()

    def add(self, device_id: int, tensors: Mapping[str, torch.Tensor], weight: float) -> bool:
        """Add device ``device_id``'s validated upload with ``weight``; False (nothing added) for a device already
        counted."""
        if device_id in self.members:
            return False
        self.mean.add(tensors, weight, check_values=False)
        self.members.add(device_id)
        return True


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Check that an aggregation result holds only finite values before it is published.

    Raises:
        AggregationFailed: naming the first few tensors with NaN or Inf.
    """
    bad = [name for name, t in sorted(tensors.items()) if t.is_floating_point() and not math.isfinite(_abs_max(t))]
    if bad:
        raise AggregationFailed(f"the aggregated global has NaN or Inf values in {len(bad)} tensor(s), e.g. "
                                f"{bad[:3]}; it was not published. Look for devices whose uploads are far larger than "
                                "the others' (a lower max_abs_value refuses them)")


def content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of what an upload says, independent of how it was serialised.

    Covers the tensors sorted by name (name, dtype, shape, raw bytes) and the metadata items sorted by key, so two
    safetensors files that differ only in the order of their header keys (safetensors writes metadata in a random
    order) have the same digest, and any difference in values gives another.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, dtype_name(t), list(t.shape)]).encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # length fixed by dtype and shape
    digest.update(json.dumps(sorted(metadata.items())).encode())
    return digest.hexdigest()


def weight_for(rule: str, tokens: int) -> float:
    """Aggregation weight of one update under ``rule`` (uniform mean as in the paper, or by training tokens).

    Raises:
        InvalidUpdate: for a token count that is not positive under ``token_weighted``, or an unknown rule.
    """
    if rule == "mean":
        return 1.0
    if rule == "token_weighted":
        if tokens <= 0:
            raise InvalidUpdate(f"token-weighted aggregation needs a positive token count, got {tokens}; send the "
                                "number of training tokens of the round as safetensors metadata 'tokens'")
        return float(tokens)
    raise InvalidUpdate(f"unknown aggregation rule {rule!r}; choose from {RULES}")
