"""The operator's page (``GET /``) and the read-only device list it shows (``GET /status/devices``).

The page is one self-contained HTML file (``aggregator/static/operator.html``: inline CSS, inline JavaScript, the
chart drawn on a ``<canvas>``); it loads nothing from elsewhere and polls ``/status`` and ``/status/devices``. A
Content-Security-Policy that allows only that one inline script and style (by hash) and requests to this server
keeps it that way, and stops any injected markup from running.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from ..deps import FederationDep

router = APIRouter(tags=["operator"])


class DeviceSummary(BaseModel):
    """What the operator's page shows of a device. Never its token."""

    id: int
    name: str
    n_specialists: int
    n_generalists: int
    rank: int
    enrolled_at: float
    last_round: int | None = Field(description="the latest round this device uploaded to (None: never)")
    last_upload_at: float | None = Field(description="when that upload arrived (Unix time)")
    retired_at: float | None = Field(default=None, description="when the admin retired it (None: active)")


def _sha256_source(body: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (hashes of its one inline script and one inline style)."""
    html = resources.files("aggregator").joinpath("static/operator.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    if len(scripts) != 1 or len(styles) != 1:
        raise RuntimeError(f"operator.html must hold exactly one <script> and one <style> (found {len(scripts)} "
                           f"and {len(styles)})")
    csp = ("default-src 'none'; "
           f"script-src {_sha256_source(scripts[0])}; style-src {_sha256_source(styles[0])}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


@router.get("/", response_class=HTMLResponse)
def operator_page() -> HTMLResponse:
    """The operator's page: configuration, rounds with participation, mean metrics per round, devices."""
    html, csp = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


@router.get("/status/devices", response_model=list[DeviceSummary])
def status_devices(federation: FederationDep) -> list[DeviceSummary]:
    """Enrolled devices with their capabilities and their latest upload (round and time)."""
    return [DeviceSummary(id=a.device.id, name=a.device.name,
                          n_specialists=int(a.device.capabilities.get("n_specialists", 0)),
                          n_generalists=int(a.device.capabilities.get("n_generalists", 1)),
                          rank=int(a.device.capabilities["rank"]), enrolled_at=a.enrolled_at,
                          last_round=a.last_round, last_upload_at=a.last_upload_at,
                          retired_at=a.device.retired_at)
            for a in federation.store.device_activity()]
