"""Request and response bodies of the HTTP API (JSON). Tensors travel as safetensors bodies, never as JSON."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FederationConfig(BaseModel):
    """What an admin fixes when creating the federation."""

    base_model: str = Field(min_length=1, description="base model every device must use, e.g. smollm2-135m")
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    shared_roles: list[str] = Field(default=["attention", "generalist"],
                                    description="adapter roles averaged across devices (paper: attention LoRA and "
                                                "generalist experts)")
    min_devices: int = Field(default=1, ge=1, description="a round never closes with fewer reports")
    round_deadline_s: float = Field(default=600.0, gt=0, description="after this, a round closes with whoever "
                                                                       "reported, if at least min_devices did")
    aggregation: Literal["mean", "token_weighted"] = "mean"
    strategy: str = Field(default="comigs-1gxs", min_length=1,
                          description="collaboration strategy every device must run (device_sdk.strategies)")


class CreateFederation(BaseModel):
    config: FederationConfig
    enroll_secret: str | None = Field(default=None, min_length=8,
                                      description="secret devices enroll with (generated when absent)")


class FederationCreated(BaseModel):
    config: FederationConfig
    enroll_secret: str


class Capabilities(BaseModel):
    n_specialists: int = Field(ge=0)
    n_generalists: int = Field(default=1, ge=0)
    rank: int = Field(gt=0)
    base_model: str | None = Field(default=None, description="checked against the federation's when given")
    strategy: str | None = Field(default=None, description="checked against the federation's when given")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; checked against the federation's when "
                                                              "given (the server weighs HetLoRA/FlexLoRA updates by "
                                                              "the LoRA scale)")


class EnrollRequest(BaseModel):
    enroll_secret: str
    name: str = Field(min_length=1, max_length=200)
    capabilities: Capabilities


class Enrolled(BaseModel):
    device_id: int
    token: str
    config: FederationConfig


class RoundState(BaseModel):
    round: int
    status: str
    base_version: int
    deadline: float
    reported: int
    expected: int
    you_reported: bool | None = None


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


class Status(BaseModel):
    ready: bool
    config: FederationConfig | None
    devices: int
    current_round: RoundState | None
    history: list[RoundSummary]


class ErrorBody(BaseModel):
    error: str
    detail: str
    extra: dict = {}
