"""An upload's bytes, as a device writes them and a server reads them: a safetensors file (no pickle) whose
metadata carries the round's training token count and the device's metrics.

Every bound lives here, so that no number a device sends can crash a server (SQLite integers, JSON answers) or
poison an aggregate, and the canonical metadata an upload's content digest covers is defined once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import InvalidUpload

#: Largest token count an upload may report: below 2^53, token weights and their sums stay exact in float64.
MAX_TOKENS = 2**53 - 1
#: Largest |value| of a reported metric (losses, perplexities, rates; beyond it a model has diverged).
MAX_METRIC = 1e15
#: At most this many metrics per upload, with names of at most :data:`MAX_METRIC_NAME` characters.
MAX_METRICS = 32
MAX_METRIC_NAME = 100


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file of ``tensors`` (made contiguous) with string ``metadata``."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)


def encode_upload(tensors: Mapping[str, torch.Tensor], tokens: int, metrics: Mapping[str, float]) -> bytes:
    """What a device uploads after a round: its shared tensors, its training ``tokens`` and its ``metrics``."""
    return encode(tensors, {"tokens": str(int(tokens)), "metrics": json.dumps(dict(metrics))})


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors payload.

    Raises:
        InvalidUpload: for anything that is not a complete safetensors file.
    """
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidUpload(f"body is not a valid safetensors file: {err}") from err
    header_len = int.from_bytes(data[:8], "little")
    try:
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except ValueError as err:
        raise InvalidUpload(f"safetensors header is not JSON: {err}") from err
    return tensors, metadata


def read_metadata(metadata: Mapping[str, str]) -> tuple[int, dict[str, float]]:
    """The token count and the numeric metrics of an upload's safetensors metadata.

    ``tokens``: a decimal integer in [0, 2^53) (0 when absent). ``metrics``: a JSON object; its finite numbers of
    magnitude up to :data:`MAX_METRIC` are kept, other values (strings, lists) are ignored.

    Raises:
        InvalidUpload: for a token count or a metric that is not a number in range (NaN, Infinity, 1e400, 2^63).
    """
    raw_tokens = metadata.get("tokens", "0")
    if not isinstance(raw_tokens, str) or not re.fullmatch(r"[0-9]{1,20}", raw_tokens) \
            or int(raw_tokens) > MAX_TOKENS:
        raise InvalidUpload(f"update metadata 'tokens' must be a decimal integer from 0 to {MAX_TOKENS} (the "
                            f"training tokens of the round), got {str(raw_tokens)[:40]!r}")
    tokens = int(raw_tokens)
    try:
        metrics = json.loads(metadata.get("metrics", "{}"), parse_constant=_refuse_constant)
    except (ValueError, TypeError, RecursionError) as err:
        raise InvalidUpload(f"update metadata 'metrics' must be a JSON object of finite numbers: {err}") from err
    if not isinstance(metrics, dict):
        raise InvalidUpload("update metadata 'metrics' must be a JSON object, e.g. {\"valid_loss\": 2.5}")
    clean = {}
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not (isinstance(v, float) and math.isfinite(v) or isinstance(v, int)) or abs(v) > MAX_METRIC:
            raise InvalidUpload(f"update metric {str(k)[:40]!r} is {str(v)[:40]}; metrics must be finite numbers of "
                                f"magnitude at most {MAX_METRIC:g}")
        clean[str(k)] = float(v)
    if len(clean) > MAX_METRICS or any(len(k) > MAX_METRIC_NAME for k in clean):
        raise InvalidUpload(f"an upload reports at most {MAX_METRICS} metrics with names of at most "
                            f"{MAX_METRIC_NAME} characters, got {len(clean)}")
    return tokens, clean


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a metric may have")


def canonical_metadata(metadata: Mapping[str, str], tokens: int, metrics: Mapping[str, float]) -> dict[str, str]:
    """The metadata an upload's content digest covers: its values as a server reads them (token count, numeric
    metrics), other entries as sent."""
    canonical = {k: v for k, v in metadata.items() if k not in ("tokens", "metrics")}
    canonical.update(tokens=str(tokens), metrics=json.dumps(dict(metrics), sort_keys=True))
    return canonical
