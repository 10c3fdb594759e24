"""Errors of the federated rules: an upload that cannot count, or uploads that disagree."""

from __future__ import annotations

from ..errors import SDKError


class FederatedError(SDKError):
    """Base class of the federated rules' errors."""


class InvalidUpload(FederatedError, ValueError):
    """Tensors (or their weight) that a rule cannot use: keys, shapes or dtypes that do not match the federation's
    spec or each other, non-finite values, values beyond the federation's bound, a non-positive weight.

    Attributes:
        problems: each problem in one line (at most a few of each kind).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [message])
