"""Server settings, from arguments or ``AGGREGATOR_*`` environment variables, and the rule for secrets."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The shortest admin token or enrollment secret accepted: 16 random bytes written in URL-safe base64.
MIN_SECRET_CHARS = 22
#: How to generate a secret that passes, quoted in every refusal.
SECRET_HOWTO = 'python -c "import secrets; print(secrets.token_urlsafe(24))"'


def check_secret(value: str, what: str) -> str:
    """Refuse a secret shorter than 16 random bytes' worth (:data:`MIN_SECRET_CHARS` URL-safe base64 characters).

    Args:
        value: the secret.
        what: how the caller names it in the message, e.g. ``"AGGREGATOR_ADMIN_TOKEN"``.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: saying the rule and how to generate a secret that passes.
    """
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"{what} has {len(value)} characters; a secret needs at least {MIN_SECRET_CHARS} (16 random "
                         f"bytes in URL-safe base64) so that it cannot be guessed. Generate one with: {SECRET_HOWTO}")
    return value


class Settings(BaseSettings):
    """Aggregator settings. Every field can be set as ``AGGREGATOR_<FIELD>`` in the environment.

    Attributes:
        data_dir: where the database file and the blobs live. One server at a time: a second one on the same
            folder refuses to start (``data_dir/aggregator.lock``).
        host, port: where uvicorn listens (port 0: any free port).
        admin_token: bearer token of the admin endpoints, at least 22 characters (16 random bytes); generated and
            written to ``data_dir/admin_token`` (mode 0600) when unset.
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

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, value: str | None) -> str | None:
        if not value:  # unset or empty: a token is generated
            return None
        return check_secret(value, "the admin token (AGGREGATOR_ADMIN_TOKEN)")
