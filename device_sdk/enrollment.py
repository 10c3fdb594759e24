"""A device's credentials: enrolled once, kept in its state folder, never a second device for one folder.

The device picks its bearer token and writes it to ``enrolling.json`` before it asks the server. The server answers
a repeated enrollment with the same token as it answered the first, so an answer lost to a timeout, a retry, or a
crash between the server's answer and ``credentials.json`` all end with one device, whose token the folder holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .client import AggregatorClient, RetryPolicy, ServerRejected
from .errors import ConfigError
from .federated.secrets import new_secret
from .fileio import atomic_write_bytes

log = logging.getLogger(__name__)

CREDENTIALS = "credentials.json"
#: The token of an enrollment that was asked for and may have reached the server (removed once it is answered).
PENDING = "enrolling.json"


class NotEnrolled(ConfigError):
    """The device has no credentials yet and no enrollment secret to get them."""


def credentials(server: str, state_dir: Path, enroll_secret: str | None, name: str, capabilities: dict,
                retry: RetryPolicy = RetryPolicy()) -> dict:
    """``{"device_id", "token", "server"}`` from ``state_dir/credentials.json``, enrolling first if it is missing.

    Raises:
        NotEnrolled: no credentials and no ``enroll_secret``.
        ConfigError: an earlier enrollment from this folder reached the server with other settings (``name`` or
            ``capabilities`` changed since).
        ServerRejected, ServerUnreachable: as :meth:`AggregatorClient.enroll`.
    """
    path, pending = state_dir / CREDENTIALS, state_dir / PENDING
    if path.is_file():
        return json.loads(path.read_text())
    if not enroll_secret:
        raise NotEnrolled(f"this device is not enrolled yet ({path} is missing); pass enroll_secret (the admin's "
                          "enrollment secret)")
    if pending.is_file():
        token = json.loads(pending.read_text())["token"]
        log.info("repeating the enrollment begun earlier from %s", state_dir)
    else:
        token = new_secret(32)
        atomic_write_bytes(pending, json.dumps({"token": token, "server": server}).encode(), mode=0o600)
    with AggregatorClient(server, retry=retry) as client:
        try:
            answer = client.enroll(enroll_secret, name, capabilities, token=token)
        except ServerRejected as err:
            if err.code == "device_retired":
                raise ConfigError(f"the admin retired the device that {state_dir} enrolled ({err.detail}); delete "
                                  f"{pending} to enroll as a new device") from err
            if err.status == 409 and err.code == "conflict":
                raise ConfigError(f"an enrollment begun earlier from {state_dir} reached the aggregator with other "
                                  f"settings ({err.detail}); join with those settings, or delete {pending} to enroll "
                                  "as a new device") from err
            raise
    if answer["token"] != token:  # an aggregator from before client-chosen tokens: it made one (keep that)
        log.warning("the aggregator at %s picked the device token itself (an older version): a retried enrollment "
                    "there may enroll a second device", server)
    found = {"device_id": answer["device_id"], "token": answer["token"], "server": server}
    atomic_write_bytes(path, json.dumps(found).encode(), mode=0o600)
    pending.unlink(missing_ok=True)
    log.info("enrolled as device %d", found["device_id"])
    return found
