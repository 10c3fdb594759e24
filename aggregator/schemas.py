"""Request and response bodies of the HTTP API (JSON). Tensors travel as safetensors bodies, never as JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from device_sdk.federated.roles import SHARED_ROLES, role_names
from device_sdk.federated.tensors import DEFAULT_MAX_ABS

from .settings import check_secret

# Every free-text field of a request has a length bound: besides bounding the work, a bound makes pydantic refuse
# strings that are not valid Unicode (a JSON "\ud800" escape) with 422 before they reach hashing or the database.
_MAX_SECRET_CHARS = 1024


class FederationConfig(BaseModel):
    """What an admin fixes when creating the federation."""

    base_model: str = Field(min_length=1, max_length=200,
                            description="base model every device must use, e.g. smollm2-135m")
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0, allow_inf_nan=False)
    shared_roles: list[str] = Field(default=role_names(SHARED_ROLES),
                                    description="adapter roles averaged across devices (paper: attention LoRA and "
                                                "generalist experts)")
    min_devices: int = Field(default=1, ge=1, description="a round never closes with fewer reports")
    round_deadline_s: float = Field(default=600.0, gt=0, allow_inf_nan=False,
                                    description="after this, a round closes with whoever reported, if at least "
                                                "min_devices did")
    aggregation: Literal["mean", "token_weighted"] = "mean"
    strategy: str = Field(default="comigs-1gxs", min_length=1, max_length=200,
                          description="collaboration strategy every device must run (device_sdk.federated.catalog)")
    max_abs_value: float = Field(default=DEFAULT_MAX_ABS, gt=0, le=3.4e38, allow_inf_nan=False,
                                 description="largest |value| an uploaded tensor may hold (422 above it). LoRA "
                                             "factors are of order 1; the bound keeps a diverged or hostile device "
                                             "from turning the global into NaN (HetLoRA's norm weights overflow)")


class CreateFederation(BaseModel):
    config: FederationConfig
    enroll_secret: str | None = Field(default=None, max_length=_MAX_SECRET_CHARS,
                                      description="secret devices enroll with (generated when absent); at least "
                                                  "22 characters (16 random bytes in URL-safe base64)")

    @field_validator("enroll_secret")
    @classmethod
    def _strong_secret(cls, value: str | None) -> str | None:
        return None if value is None else check_secret(value, "enroll_secret")


class FederationCreated(BaseModel):
    config: FederationConfig
    enroll_secret: str


class Capabilities(BaseModel):
    n_specialists: int = Field(ge=0)
    n_generalists: int = Field(default=1, ge=0)
    rank: int = Field(gt=0)
    base_model: str | None = Field(default=None, max_length=200,
                                   description="checked against the federation's when given")
    strategy: str | None = Field(default=None, max_length=200,
                                 description="checked against the federation's when given")
    alpha: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                description="LoRA alpha; checked against the federation's when given (the server "
                                            "weighs HetLoRA/FlexLoRA updates by the LoRA scale)")


class EnrollRequest(BaseModel):
    enroll_secret: str = Field(max_length=_MAX_SECRET_CHARS)
    name: str = Field(min_length=1, max_length=200)
    capabilities: Capabilities
    token: str | None = Field(default=None, max_length=_MAX_SECRET_CHARS,
                              description="the bearer token this device chose (at least 22 characters: 16 random "
                                          "bytes in URL-safe base64; SDK devices send 32). The same request again "
                                          "answers with the same device, so a retry never enrolls a second one. "
                                          "Absent: the server picks a token, and a repeat enrolls another device.")

    @field_validator("token")
    @classmethod
    def _strong_token(cls, value: str | None) -> str | None:
        return None if value is None else check_secret(value, "token")


class Enrolled(BaseModel):
    device_id: int
    token: str
    config: FederationConfig


class DeviceRetired(BaseModel):
    device_id: int
    name: str
    retired_at: float = Field(description="when the admin retired the device (Unix time)")


class RoundState(BaseModel):
    round: int
    status: str
    base_version: int
    deadline: float
    reported: int
    expected: int
    you_reported: bool | None = None
    failure: str | None = Field(default=None, description="why the round failed to aggregate (status 'failed'): "
                                                          "uploads are refused until the admin retries or closes it")


class UploadAccepted(BaseModel):
    round: int
    duplicate: bool
    reported: int
    expected: int


class RoundSummary(BaseModel):
    round: int
    status: str
    base_version: int
    participants: list[int]
    tokens: int
    mean_metrics: dict[str, float]
    opened_at: float
    closed_at: float | None
    rule: str | None = Field(default=None, description="the aggregation rule of a closed round (mean, "
                                                       "token_weighted, or the strategy's own rule)")
    failure: str | None = Field(default=None, description="why a failed round did not produce a global version")


class Status(BaseModel):
    ready: bool
    config: FederationConfig | None
    devices: int
    current_round: RoundState | None
    history: list[RoundSummary]


class ErrorBody(BaseModel):
    """The body of every error answer (4xx and 5xx), whatever raised it: a domain error, a refused token, a request
    that does not match this schema (422)."""

    error: str = Field(description="a stable reason code, e.g. unauthorized, round_closed, invalid_update, "
                                   "invalid_request")
    detail: str = Field(description="what was wrong and what to do, for people")
    extra: dict[str, Any] = Field(description="machine-readable details, e.g. current_round on a 409 (may be "
                                              "empty)")


#: Every error status the API answers with and what it means. Routes declare theirs with :func:`error_responses`;
#: the OpenAPI schema adds those their dependencies imply (``aggregator.deps.DEPENDENCY_ERRORS``), 422 wherever a
#: request has parameters or a JSON body, and 400 wherever it has a JSON body.
ERROR_STATUSES: dict[int, str] = {
    400: "the request body could not be read (e.g. JSON that is not UTF-8)",
    401: "missing or unknown bearer token (or a wrong enrollment secret)",
    403: "a device token on an admin endpoint",
    404: "no such round, global version or device",
    409: "conflicts with the federation's state: not set up yet, already set up, the round is closed, or this "
         "device already uploaded other tensors for the round",
    413: "the request body exceeds the server's upload limit",
    422: "the request does not match this schema, or the uploaded tensors do not match the federation",
    500: "the server could not complete the operation (the detail says why)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that answers with these error statuses (each with :class:`ErrorBody`).

    Raises:
        ValueError: for a status missing from :data:`ERROR_STATUSES` (add it there first).
    """
    unknown = sorted(set(statuses) - set(ERROR_STATUSES))
    if unknown:
        raise ValueError(f"error statuses {unknown} are not in aggregator.schemas.ERROR_STATUSES; describe them there")
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}
