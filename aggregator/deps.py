"""FastAPI dependencies: the federation, the calling device, the admin check, bounded request bodies and path
numbers.

Each dependency that refuses a request names the statuses it answers with in :data:`DEPENDENCY_ERRORS`; the
published OpenAPI schema (``aggregator.docs``) declares them on every route that uses it, so a route added later
documents its 401/403/413 without repeating them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Forbidden, Unauthorized
from .service import Federation
from .store import Device

#: The largest round number or global version a path may name. Rounds are counted from 1, one per aggregation;
#: 2^31 - 1 outlasts any federation and stays exact in every JSON client (JavaScript numbers included). Larger
#: numbers get 422 with the usual error body instead of reaching the database.
MAX_NUMBER = 2**31 - 1

RoundNumber = Annotated[int, Path(ge=1, le=MAX_NUMBER, description="a round number (rounds count from 1)")]
DeviceId = Annotated[int, Path(ge=1, le=MAX_NUMBER, description="a device id (as /enroll and /status/devices give it)")]
GlobalVersion = Annotated[int, Path(ge=0, le=MAX_NUMBER, description="a global version (0: the admin's initial "
                                                                     "tensors; n: the result of round n)")]

# auto_error=False: a missing or malformed header reaches our checks, which answer with the documented 401 body.
# Two schemes so that the docs page's Authorize dialog asks for each token where it applies.
device_bearer = HTTPBearer(scheme_name="deviceToken", auto_error=False,
                           description="the device token that POST /enroll returned")
admin_bearer = HTTPBearer(scheme_name="adminToken", auto_error=False,
                          description="the admin token (AGGREGATOR_ADMIN_TOKEN, or the one the server generated in "
                                      "<data-dir>/admin_token)")


def dependants(dependant: Dependant) -> Iterator[Dependant]:
    """A route's dependant and all of its dependencies, at any depth."""
    yield dependant
    for sub in dependant.dependencies:
        yield from dependants(sub)


def get_federation(request: Request) -> Federation:
    return request.app.state.federation


FederationDep = Annotated[Federation, Depends(get_federation)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials.strip() if credentials is not None else None


def get_device(federation: FederationDep,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(device_bearer)]) -> Device:
    return federation.authenticate(_token(credentials))


DeviceDep = Annotated[Device, Depends(get_device)]


def require_admin(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]) -> None:
    token = _token(credentials)
    if token is not None and request.app.state.federation.store.device_for_token(token) is not None:
        raise Forbidden("device tokens cannot call admin endpoints")
    # Bytes, not str: compare_digest refuses non-ASCII strings (a header may carry any Latin-1 character).
    if token is None or not secrets.compare_digest(token.encode("utf-8"),
                                                   request.app.state.admin_token.encode("utf-8")):
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>' (see the server log or "
                           "<data-dir>/admin_token)")


AdminDep = Annotated[None, Depends(require_admin)]


async def read_body(request: Request) -> bytes:
    """The request body of a route that takes a safetensors file. Its size limit (``max_upload_mb``, 413 past it)
    is kept by :class:`aggregator.body_limit.BodyLimit`, which finds these routes by this dependency and counts the
    bytes as this reads them (declare it after the token check: the body is read only once that passed)."""
    return await request.body()


BodyDep = Annotated[bytes, Depends(read_body)]

#: The error statuses each dependency answers with (declared in OpenAPI on every route that depends on it).
DEPENDENCY_ERRORS: dict[Callable, tuple[int, ...]] = {
    get_device: (401,),
    require_admin: (401, 403),
    read_body: (413,),
}
