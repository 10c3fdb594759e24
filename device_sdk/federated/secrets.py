"""The rule for a federation's secrets (admin token, enrollment secret), checked by the server and, before anything
is sent, by the command line."""

from __future__ import annotations

import secrets

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


def new_secret(nbytes: int = 32) -> str:
    """A random URL-safe secret of ``nbytes`` random bytes that never starts with ``-`` (command lines would read
    it as an option): tokens, enrollment secrets, and what a client picks so that a retried request repeats it."""
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value
