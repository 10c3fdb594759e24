"""The aggregator's glue around the federated rules (:mod:`device_sdk.federated`, the one home of aggregation and
upload validation, shared with the simulation): refusals as HTTP-mapped errors, one open round's running mean,
the check before a global is published, and the digest that recognises a replayed upload. No rule is written here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from device_sdk.federated import (MEAN_RULES, InvalidUpload, RunningMean, TensorSpec, dtype_name, nonfinite,
                                  spec_of)
from device_sdk.federated import validate as _validate
from device_sdk.federated import weight_for as _weight_for

from .errors import AggregationFailed, InvalidUpdate

#: Aggregation rules a federation of a mean-rule strategy can use.
RULES = MEAN_RULES

__all__ = ["RULES", "RoundMean", "RunningMean", "TensorSpec", "as_invalid_update", "check_finite", "content_digest",
           "dtype_name", "spec_of", "validate", "weight_for"]


@contextmanager
def as_invalid_update() -> Iterator[None]:
    """Raise the federated rules' :class:`~device_sdk.federated.InvalidUpload` as :class:`InvalidUpdate` (422)."""
    try:
        yield
    except InvalidUpload as err:
        raise InvalidUpdate(err.message, problems=err.problems) from err


def validate(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec],
             max_abs: float | None = None) -> None:
    """:func:`device_sdk.federated.validate`.

    Raises:
        InvalidUpdate: listing the problems.
    """
    with as_invalid_update():
        _validate(tensors, spec, max_abs)


def weight_for(rule: str, tokens: int) -> float:
    """:func:`device_sdk.federated.weight_for`.

    Raises:
        InvalidUpdate: for a token count that is not positive under ``token_weighted``, or an unknown rule.
    """
    with as_invalid_update():
        return _weight_for(rule, tokens)


class RoundMean:
    """The running (weighted) mean of one open round's accepted uploads; each device counts once."""

    def __init__(self, number: int, spec: Mapping[str, TensorSpec]) -> None:
        self.round = number
        self.mean = RunningMean(spec)
        self.members: set[int] = set()

    def add(self, device_id: int, tensors: Mapping[str, torch.Tensor], weight: float) -> bool:
        """Add device ``device_id``'s validated upload with ``weight``; False (nothing added) for a device already
        counted.

        Raises:
            InvalidUpdate: for a key set other than the spec's, or a weight that is not positive.
        """
        if device_id in self.members:
            return False
        with as_invalid_update():
            self.mean.add(tensors, weight, check_values=False)
        self.members.add(device_id)
        return True


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Check that an aggregation result holds only finite values before it is published.

    Raises:
        AggregationFailed: naming the first few tensors with NaN or Inf.
    """
    bad = nonfinite(tensors)
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
