"""Server settings, from arguments or ``AGGREGATOR_*`` environment variables (secrets checked by
:func:`device_sdk.federated.secrets.check_secret`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_sdk.federated.secrets import check_secret


class Settings(BaseSettings):
    """Aggregator settings. Every field can be set as ``AGGREGATOR_<FIELD>`` in the environment.

    Attributes:
        data_dir: where the database file and the blobs live. One server at a time: a second one on the same
            folder refuses to start (``data_dir/aggregator.lock``).
        host, port: where uvicorn listens (port 0: any free port).
        admin_token: bearer token of the admin endpoints, at least 22 characters (16 random bytes); generated and
            written to ``data_dir/admin_token`` (mode 0600) when unset.
        max_upload_mb: largest accepted safetensors body (uploads, the initial tensors); JSON bodies take at most
            64 KiB (:mod:`aggregator.body_limit`).
        tick_s: how often deadlines are checked.
    """

    model_config = SettingsConfigDict(env_prefix="AGGREGATOR_")

    data_dir: Path = Path("aggregator-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    admin_token: str | None = None
    max_upload_mb: float = Field(default=64.0, gt=0)
    tick_s: float = Field(default=0.5, gt=0)

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, value: str | None) -> str | None:
        if not value:  # unset or empty: a token is generated
            return None
        return check_secret(value, "the admin token (AGGREGATOR_ADMIN_TOKEN)")
