"""FastAPI dependencies: the federation, the calling device, the admin check, bounded request bodies."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import Forbidden, PayloadTooLarge, Unauthorized
from .service import Federation
from .store import Device


def get_federation(request: Request) -> Federation:
    return request.app.state.federation


FederationDep = Annotated[Federation, Depends(get_federation)]


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def get_device(federation: FederationDep, authorization: Annotated[str | None, Header()] = None) -> Device:
    return federation.authenticate(_bearer(authorization))


DeviceDep = Annotated[Device, Depends(get_device)]


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    token = _bearer(authorization)
    if token is not None and request.app.state.federation.store.device_for_token(token) is not None:
        raise Forbidden("device tokens cannot call admin endpoints")
    if token is None or not secrets.compare_digest(token, request.app.state.admin_token):
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>' (see the server log or "
                           "<data-dir>/admin_token)")


AdminDep = Annotated[None, Depends(require_admin)]


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds the configured limit."""
    limit = int(request.app.state.settings.max_upload_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


BodyDep = Annotated[bytes, Depends(read_body)]
