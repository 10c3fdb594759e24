"""The federated rules, in one home: aggregation and upload validation as pure functions over named tensors and
per-device metadata, the set of shared roles, and every strategy's server side by name.

Needs only torch (no model code, no transformers, no web framework): the aggregator, the in-process simulation
and any other engine (Flower) import this package and call the same functions.

- :mod:`.tensors`: :class:`TensorSpec`, :func:`validate`, :class:`RunningMean`, :func:`mean`, :func:`fit`, ...
- :mod:`.upload`: :class:`Upload` (one device's tensors, tokens, rank, alpha, roles), :func:`common_start`.
- :mod:`.rules`: the server rules and :data:`RULES` (name -> rule), :func:`weight_for`.
- :mod:`.catalog`: :class:`StrategySpec` per strategy name (:func:`spec_for`, :data:`NETWORKED`, ...).
- :mod:`.roles`: :class:`Role`, :data:`SHARED_ROLES`.
- :mod:`.wire`: an upload's bytes (safetensors with token count and metrics) and their bounds.
"""

from .catalog import (ABLATIONS, ALL, CORE, DEFAULT_NETWORKED, HETEROGENEOUS, NETWORKED, SPECS, StrategySpec,
                      networked_spec, spec_for)
from .errors import FederatedError, InvalidUpload
from .roles import SHARED_ROLES, Role
from .rules import MEAN_RULES, RULES, weight_for
from .tensors import (DEFAULT_MAX_ABS, RunningMean, TensorSpec, abs_max, cut, dtype_name, factor_rank, fit,
                      lora_pairs, lora_scale, mean, nonfinite, rank_shape, spec_of, validate)
from .upload import Upload, common_start, largest

__all__ = [
    "ABLATIONS", "ALL", "CORE", "DEFAULT_MAX_ABS", "DEFAULT_NETWORKED", "HETEROGENEOUS", "MEAN_RULES", "NETWORKED",
    "RULES", "SHARED_ROLES", "SPECS", "FederatedError", "InvalidUpload", "Role", "RunningMean", "StrategySpec",
    "TensorSpec", "Upload", "abs_max", "common_start", "cut", "dtype_name", "factor_rank", "fit", "largest",
    "lora_pairs", "lora_scale", "mean", "networked_spec", "nonfinite", "rank_shape", "spec_for", "spec_of",
    "validate", "weight_for",
]
