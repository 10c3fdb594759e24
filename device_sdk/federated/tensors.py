"""Named tensors: their spec, validation, the one mean, and the LoRA-factor helpers every rule uses.

Everything here is a pure function of ``{name: tensor}`` dicts (torch only): the aggregator, the in-process
simulation and any other engine call the same code, so they give bit-identical numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidUpload


def lora_scale(alpha: float, rank: int) -> float:
    """The rank-stabilised LoRA scale ``gamma = alpha / sqrt(r)`` (paper eq. 4), the one place it is computed."""
    return alpha / rank**0.5


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
    """``float32`` for ``torch.float32``."""
    return str(t.dtype).removeprefix("torch.")


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec a set of tensors defines (e.g. a federation's initial global tensors), sorted by name."""
    return {name: TensorSpec(tuple(t.shape), dtype_name(t)) for name, t in sorted(tensors.items())}


def abs_max(t: torch.Tensor) -> float:
    """The largest ``|x|`` of a floating-point tensor; NaN if it holds a NaN, inf if it holds an Inf (0 if empty)."""
    if t.numel() == 0:
        return 0.0
    low, high = (float(x) for x in torch.aminmax(t))  # one pass, no temporary; NaN propagates
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


#: The default largest |value| an uploaded tensor may hold (a federation's ``max_abs_value``). LoRA factors are of
#: order 1; the bound keeps a diverged or hostile device from turning the global into NaN (HetLoRA's norm weights
#: overflow).
DEFAULT_MAX_ABS = 1e4


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf, sorted."""
    return [name for name, t in sorted(tensors.items()) if t.is_floating_point() and not math.isfinite(abs_max(t))]


def validate(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec],
             max_abs: float | None = None) -> None:
    """Check that ``tensors`` match ``spec`` exactly and hold only finite values (of magnitude at most ``max_abs``).

    Args:
        tensors: ``{name: tensor}`` of one upload.
        spec: the expected names, shapes and dtypes.
        max_abs: the largest ``|x|`` accepted (a federation's ``max_abs_value``); ``None``: any finite value.

    Raises:
        InvalidUpload: listing the problems (at most 8).
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
            largest = abs_max(t)
            if not math.isfinite(largest):
                problems.append(f"{name}: contains NaN or Inf")
            elif max_abs is not None and largest > max_abs:
                problems.append(f"{name}: a value of magnitude {largest:.3g} exceeds the federation's bound "
                                f"max_abs_value={max_abs:g}")
        if len(problems) >= 8:
            break
    if problems:
        hint = ("; check the device's training (diverged?) or create the federation with a larger max_abs_value"
                if any("max_abs_value=" in p for p in problems) else "")
        raise InvalidUpload("update does not match the federation: " + "; ".join(problems) + hint, problems)


class RunningMean:
    """Weighted mean of tensor dicts accumulated one at a time: float64 sums, one division, results in the spec's
    dtype. The one mean of the package: :func:`mean` and the aggregator's streaming mean both run it.

    Float64 sums of float32 values are exact unless their magnitudes span more than ~2^28, so the order in which
    uploads arrive does not change the float32 result.
    """

    def __init__(self, spec: Mapping[str, TensorSpec]) -> None:
        self.spec = dict(spec)
        self.sums = {name: torch.zeros(s.shape, dtype=torch.float64) for name, s in self.spec.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float = 1.0, check_values: bool = True) -> None:
        """Add one update with ``weight`` (> 0).

        Args:
            tensors: ``{name: tensor}`` with the spec's names and shapes.
            weight: its weight (1 for the uniform mean, its training tokens for the token-weighted one).
            check_values: run the full :func:`validate` (shapes, dtypes, finite values). Updates a server stored
                were validated on upload; re-reading them only needs the key set checked.

        Raises:
            InvalidUpload: a weight that is not positive, or tensors that do not match the spec (nothing is added).
        """
        if not weight > 0:
            raise InvalidUpload(f"aggregation weight must be > 0, got {weight}")
        if check_values:
            validate(tensors, self.spec)
        elif tensors.keys() != self.spec.keys():
            raise InvalidUpload("a stored update does not have the federation's key set")
        for name, t in tensors.items():
            self.sums[name].add_(t, alpha=weight)  # float32 into float64, no intermediate copy
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean, cast to each tensor's dtype.

        Raises:
            InvalidUpload: if nothing was added.
        """
        if self.count == 0:
            raise InvalidUpload("nothing to aggregate: no update was added")
        return {name: (s / self.total_weight).to(getattr(torch, self.spec[name].dtype))
                for name, s in self.sums.items()}


def mean(dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """(Weighted) mean of equally keyed and shaped tensor dicts, through :class:`RunningMean`.

    Args:
        dicts: the tensor dicts, e.g. one per device.
        weights: one weight (> 0) per dict; ``None``: the uniform mean.

    Returns:
        ``{name: mean}`` in the first dict's dtypes.

    Raises:
        InvalidUpload: if there is nothing to average or the dicts disagree on keys or shapes.
    """
    if not dicts:
        raise InvalidUpload("nothing to aggregate: no uploads")
    keys = set(dicts[0])
    for d in dicts[1:]:
        if set(d) != keys:
            raise InvalidUpload(f"uploads disagree on tensor names: {sorted(keys ^ set(d))[:3]}")
    for name in dicts[0]:
        shapes = {tuple(d[name].shape) for d in dicts}
        if len(shapes) != 1:
            raise InvalidUpload(f"uploads disagree on the shape of {name}: {sorted(shapes)}")
    running = RunningMean(spec_of(dicts[0]))
    for i, d in enumerate(dicts):
        running.add(d, 1.0 if weights is None else weights[i], check_values=False)
    result = running.result()
    return {name: result[name] for name in dicts[0]}


def fit(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Zero-pad or truncate ``tensor`` to ``shape`` (from the start of every dimension).

    Used for LoRA factors of different ranks: ``A`` is ``(r, D_in)``, ``B`` is ``(D_out, r)``; the first ``r``
    rank components are kept, missing ones are zero (HetLoRA's padding and truncation).
    """
    out = torch.zeros(shape, dtype=tensor.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, shape))
    out[region] = tensor[region]
    return out


def factor_rank(name: str, tensor: torch.Tensor) -> int:
    """The rank of LoRA factor ``name``: rows of a ``lora_A`` (r, D_in), columns of a ``lora_B`` (D_out, r).

    Raises:
        InvalidUpload: for a name that is not a LoRA factor.
    """
    if name.endswith("lora_A"):
        return tensor.shape[0]
    if name.endswith("lora_B"):
        return tensor.shape[-1]
    raise InvalidUpload(f"{name} is not a LoRA factor (a name ending in lora_A or lora_B); it has no rank")


def rank_shape(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape of LoRA factor ``name`` cut to ``rank`` components (A: rows, B: columns; others unchanged); a
    factor of lower rank (the attention LoRA of a device with a larger MLP rank) keeps its own."""
    if name.endswith("lora_A"):
        return (min(rank, shape[0]), *shape[1:])
    if name.endswith("lora_B"):
        return (*shape[:-1], min(rank, shape[-1]))
    return tuple(shape)


def cut(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every tensor zero-padded or truncated to ``shapes[name]``."""
    return {name: fit(tensors[name], shape) for name, shape in shapes.items()}


def lora_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """``{module: (A name, B name)}`` for every LoRA module in a tensor dict (names ending in lora_A / lora_B)."""
    pairs = {}
    for name in tensors:
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            if module + ".lora_B" in tensors:
                pairs[module] = (name, module + ".lora_B")
    return pairs
