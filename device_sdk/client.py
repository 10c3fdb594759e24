"""HTTP client of the aggregator (httpx).

Failures that retrying can fix (connection refused or reset, timeouts, 5xx answers) are retried with exponential
backoff; failures that it cannot fix (a URL without a scheme, any 4xx answer) raise at once, in one line. Every call
is safe to repeat (see the admin and device calls), so a retry after a lost answer changes nothing on the server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import torch

from .errors import ConfigError, SDKError
from .federated import wire
from .federated.secrets import new_secret

log = logging.getLogger(__name__)

#: Transport failures a retry can fix: the server is starting, restarting, overloaded or the network blinked.
TRANSIENT = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class ServerRejected(SDKError):
    """The aggregator answered with an error (4xx): ``status``, ``code`` and its ``detail`` say why."""

    def __init__(self, status: int, code: str, detail: str, extra: dict | None = None) -> None:
        super().__init__(f"aggregator rejected the request ({status} {code}): {detail}")
        self.status, self.code, self.detail, self.extra = status, code, detail, extra or {}


class ServerUnreachable(SDKError):
    """The aggregator could not be reached (or kept failing with 5xx) after all retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**attempt`` capped at ``max_s``, for ``attempts`` tries in all (the first
    try and ``attempts - 1`` retries). Only transient failures are retried (:data:`TRANSIENT`, 5xx answers)."""

    attempts: int = 10
    base_s: float = 0.25
    max_s: float = 8.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"attempts must be >= 1 (retries >= 0), got {self.attempts!r}")

    @classmethod
    def retries(cls, n: int) -> RetryPolicy:
        """The policy of ``n`` retries after the first try."""
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {n!r}")
        return cls(attempts=n + 1)


def check_url(url: str) -> str:
    """The aggregator's base URL without a trailing slash.

    Raises:
        ConfigError: if the URL has no ``http://`` / ``https://`` scheme or no host (retrying cannot fix it).
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        guess = url.strip() if "://" in url else "http://" + url.strip().lstrip("/")
        raise ConfigError(f"server URL {url!r} needs an http:// or https:// scheme and a host, e.g. {guess!r}")
    return url.strip().rstrip("/")


def _detail(detail) -> str:
    """An error body's ``detail`` as one line: FastAPI's request validation errors are a list of problems."""
    if isinstance(detail, list):
        messages = [str(d.get("msg", d)).removeprefix("Value error, ") if isinstance(d, dict) else str(d)
                    for d in detail]
        return "; ".join(messages)[:500]
    return str(detail)[:500]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class AggregatorClient:
    """Talks to ``python -m aggregator serve``. Tensors travel as safetensors bodies.

    Raises (from every call): :class:`ServerRejected` at once for a 4xx answer; :class:`ServerUnreachable` after
    ``retry.attempts`` tries that failed with a transient error.
    """

    def __init__(self, url: str, token: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 60.0) -> None:
        self.url = check_url(url)
        self.token = token
        self.retry = retry
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        reason, refused = "", False
        for attempt in range(self.retry.attempts):
            try:
                response = self._http.request(method, self.url + path, headers=headers, **kwargs)
            except TRANSIENT as err:
                reason, refused = _first_line(err), True
            except httpx.HTTPError as err:  # a malformed URL or request: the same on every try
                raise ServerUnreachable(f"{method} {self.url}{path} failed: {_first_line(err)}") from err
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        try:
                            body = response.json()
                        except ValueError:
                            body = {"error": "http_error", "detail": response.text[:500]}
                        if not isinstance(body, dict):
                            body = {"error": "http_error", "detail": str(body)[:500]}
                        detail = _detail(body.get("detail", ""))
                        raise ServerRejected(response.status_code, body.get("error", "error"), detail,
                                             body.get("extra"))
                    return response
                reason, refused = f"server error {response.status_code}: {response.text[:200]}", False
            if attempt + 1 < self.retry.attempts:
                delay = min(self.retry.max_s, self.retry.base_s * 2**attempt)
                log.warning("%s %s failed (%s); retry %d of %d in %.2f s", method, path, reason, attempt + 1,
                            self.retry.attempts - 1, delay)
                time.sleep(delay)
        tries = f"{self.retry.attempts} attempt{'s' * (self.retry.attempts > 1)}"
        hint = (f"is the aggregator running at {self.url}? (start it with `python -m aggregator serve`, or allow "
                "more --retries)") if refused else "see the aggregator's log"
        raise ServerUnreachable(f"{method} {self.url}{path} failed after {tries} ({reason}); {hint}")

    # checks before a long step -----------------------------------------------------------------------------------
    def health(self) -> None:
        """``GET /health``: the server is up (retried while it starts)."""
        self._request("GET", "/health")

    def federation_config(self) -> dict | None:
        """The federation's configuration from ``GET /status`` (``None`` while no federation exists)."""
        return self._request("GET", "/status").json().get("config")

    def check_device_token(self) -> None:
        """Raise :class:`ServerRejected` (401) unless the server knows this client's device token."""
        try:
            self._request("GET", "/rounds/current")
        except ServerRejected as err:
            if err.status == 401:
                raise
            # any other answer came after the token was accepted (e.g. 409: the federation is not ready yet)

    def check_admin_token(self) -> None:
        """Raise :class:`ServerRejected` (401/403) unless this client's token is the admin token. Sends an empty
        body to the initial-tensors endpoint: the token is checked before the body, and an empty body is never
        stored (the answer is then 409 or 422)."""
        try:
            self._request("PUT", "/admin/federation/initial", content=b"")
        except ServerRejected as err:
            if err.status in (401, 403):
                raise

    # admin --------------------------------------------------------------------------------------------------------
    # Every request below is safe to retry: the server answers a repeat as it answered the first (an upload by its
    # content, the initial tensors by their digest, a federation by its configuration and secret, an enrollment by
    # the token the device chose), so an answer lost to a timeout never creates a second device or a 409.

    def create_federation(self, config: dict, enroll_secret: str | None = None) -> dict:
        """Create the federation with ``enroll_secret`` (``None``: a new random one, picked here so that a retry
        repeats the request); the answer holds it."""
        secret = enroll_secret or new_secret(16)
        return self._request("POST", "/admin/federation", json={"config": config, "enroll_secret": secret}).json()

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> dict:
        return self._request("PUT", "/admin/federation/initial", content=wire.encode(tensors)).json()

    def retire_device(self, device_id: int) -> dict:
        """Retire device ``device_id`` (``DELETE /admin/devices/{id}``; again: the same answer)."""
        return self._request("DELETE", f"/admin/devices/{int(device_id)}").json()

    # devices ------------------------------------------------------------------------------------------------------
    def enroll(self, enroll_secret: str, name: str, capabilities: dict, token: str | None = None) -> dict:
        """Enroll with the bearer token ``token`` (``None``: a new random one, picked here so that a retry repeats
        the request); the answer holds ``device_id`` and ``token``. Keep the token before calling where a crash
        mid-call must not enroll a second device (:func:`device_sdk.enrollment.credentials`)."""
        return self._request("POST", "/enroll", json={"enroll_secret": enroll_secret, "name": name,
                                                      "capabilities": capabilities,
                                                      "token": token or new_secret(32)}).json()

    def current_round(self) -> dict:
        return self._request("GET", "/rounds/current").json()

    def status(self) -> dict:
        return self._request("GET", "/status").json()

    def download_global(self, version: int) -> dict[str, torch.Tensor]:
        return wire.decode(self._request("GET", f"/globals/{version}").content)[0]

    def upload(self, round_number: int, tensors: dict[str, torch.Tensor], tokens: int, metrics: dict) -> dict:
        return self.upload_payload(round_number, wire.encode_upload(tensors, tokens, metrics))

    def upload_payload(self, round_number: int, payload: bytes) -> dict:
        """Upload an encoded update (:func:`device_sdk.federated.wire.encode_upload`): the same bytes again are
        answered as the first time (``duplicate: true``)."""
        return self._request("POST", f"/rounds/{round_number}/update", content=payload,
                             headers={"Content-Type": "application/octet-stream"}).json()
