"""Server settings, from arguments or ``AGGREGATOR_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Aggregator settings. Every field can be set as ``AGGREGATOR_<FIELD>`` in the environment.

    Attributes:
        data_dir: where the database file and the blobs live.
        host, port: where uvicorn listens (port 0: any free port).
        admin_token: bearer token of the admin endpoints; generated and written to ``data_dir/admin_token``
            (mode 0600) when unset.
        max_upload_mb: largest accepted request body.
        tick_s: how often deadlines are checked.
    """

    model_config = SettingsConfigDict(env_prefix="AGGREGATOR_")

    data_dir: Path = Path("aggregator-data")
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    admin_token: str | None = None
    max_upload_mb: float = Field(default=64.0, gt=0)
    tick_s: float = Field(default=0.5, gt=0)
