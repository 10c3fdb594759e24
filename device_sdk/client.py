"""HTTP client of the aggregator (httpx), with retries and backoff on network errors and server errors."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import httpx
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import SDKError

log = logging.getLogger(__name__)


class ServerRejected(SDKError):
    """The aggregator answered with an error (4xx): ``status``, ``code`` and its ``detail`` say why."""

    def __init__(self, status: int, code: str, detail: str, extra: dict | None = None) -> None:
        super().__init__(f"aggregator rejected the request ({status} {code}): {detail}")
        self.status, self.code, self.detail, self.extra = status, code, detail, extra or {}


class ServerUnreachable(SDKError):
    """The aggregator could not be reached after all retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**attempt`` capped at ``max_s``, for ``attempts`` tries in all."""

    attempts: int = 10
    base_s: float = 0.25
    max_s: float = 8.0


class AggregatorClient:
    """Talks to ``python -m aggregator serve``. Tensors travel as safetensors bodies."""

    def __init__(self, url: str, token: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.retry = retry
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                response = self._http.request(method, self.url + path, headers=headers, **kwargs)
            except httpx.TransportError as err:
                last = err
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        try:
                            body = response.json()
                        except ValueError:
                            body = {"error": "http_error", "detail": response.text[:500]}
                        raise ServerRejected(response.status_code, body.get("error", "error"),
                                             body.get("detail", ""), body.get("extra"))
                    return response
                last = SDKError(f"server error {response.status_code}: {response.text[:200]}")
            delay = min(self.retry.max_s, self.retry.base_s * 2**attempt)
            log.warning("%s %s failed (%s); retrying in %.2f s", method, path, last, delay)
            time.sleep(delay)
        raise ServerUnreachable(f"{method} {self.url}{path} failed after {self.retry.attempts} attempts: {last}")

    # admin --------------------------------------------------------------------------------------------------------
    def create_federation(self, config: dict, enroll_secret: str | None = None) -> dict:
        return self._request("POST", "/admin/federation",
                             json={"config": config, "enroll_secret": enroll_secret}).json()

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> dict:
        return self._request("PUT", "/admin/federation/initial", content=st_save(tensors)).json()

    # devices ------------------------------------------------------------------------------------------------------
    def enroll(self, enroll_secret: str, name: str, capabilities: dict) -> dict:
        return self._request("POST", "/enroll", json={"enroll_secret": enroll_secret, "name": name,
                                                      "capabilities": capabilities}).json()

    def current_round(self) -> dict:
        return self._request("GET", "/rounds/current").json()

    def status(self) -> dict:
        return self._request("GET", "/status").json()

    def download_global(self, version: int) -> dict[str, torch.Tensor]:
        return st_load(self._request("GET", f"/globals/{version}").content)

    def upload(self, round_number: int, tensors: dict[str, torch.Tensor], tokens: int, metrics: dict) -> dict:
        payload = st_save({k: v.contiguous() for k, v in tensors.items()},
                          metadata={"tokens": str(int(tokens)), "metrics": json.dumps(metrics)})
        return self._request("POST", f"/rounds/{round_number}/update", content=payload,
                             headers={"Content-Type": "application/octet-stream"}).json()
