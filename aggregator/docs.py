"""The API's published contract (``/openapi.json``) and its docs pages (``/docs``, ``/redoc``), served offline.

The contract: every route declares each error status it answers with, all with :class:`~aggregator.schemas.ErrorBody`
(the body the exception handlers in ``app.py`` write). A route declares the statuses of its own domain errors with
``responses=error_responses(...)``; :func:`contract_openapi` adds those its dependencies imply
(:data:`aggregator.deps.DEPENDENCY_ERRORS`: 401, 403, 413) and its JSON body implies (400, 413, 422), and turns
FastAPI's 422 ``HTTPValidationError``, which our handler never writes, into ``ErrorBody``. A route added later is
covered without repeating any of it; ``tests/integration/test_openapi.py`` holds every route to these rules.

The docs pages load Swagger UI and ReDoc from this server (the ``fastapi-offline`` package ships their scripts),
never from a CDN, so they work on a network without internet access.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.staticfiles import StaticFiles

from .deps import DEPENDENCY_ERRORS, dependants
from .schemas import ERROR_STATUSES, ErrorBody

#: Where the Swagger UI and ReDoc files are served from (``fastapi_offline/static`` in the installed package).
ASSETS_URL = "/docs-assets"
_ERROR_REF = "#/components/schemas/ErrorBody"
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")


def api_routes(app: FastAPI) -> Iterator[RouteContext]:
    """The app's API routes in its OpenAPI schema, routers included (what FastAPI's schema generator walks)."""
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            yield route


def implied_errors(route: RouteContext) -> set[int]:
    """The error statuses a route answers with because of the dependencies it uses (at any depth) and its JSON body
    (FastAPI answers 400 to a body it cannot decode, 422 to one that does not validate; :mod:`aggregator.body_limit`
    413 to one that is too large)."""
    statuses = {status for d in dependants(route.dependant) for status in DEPENDENCY_ERRORS.get(d.call, ())}
    if route.body_field is not None:
        statuses |= {400, 413, 422}
    return statuses


def _error_response(status: int) -> dict[str, Any]:
    return {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": {"$ref": _ERROR_REF}}}}


def _declare_errors(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    """Complete FastAPI's schema in place: implied error statuses, and ``ErrorBody`` for 422 (idempotent)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
    for route in api_routes(app):
        for method in route.methods:
            responses = schema["paths"][route.path_format][method.lower()]["responses"]
            for status in sorted(implied_errors(route)):
                responses.setdefault(str(status), _error_response(status))
            if "422" in responses:  # FastAPI declares HTTPValidationError, which our handler never writes
                responses["422"] = _error_response(422)
            ordered = dict(sorted(responses.items()))
            responses.clear()
            responses.update(ordered)
    if not any(f"#/components/schemas/{name}" in str(schema["paths"]) for name in _FASTAPI_422):
        for name in _FASTAPI_422:
            schemas.pop(name, None)
    return schema


def contract_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema with every error response declared (install as ``app.openapi``)."""
    return _declare_errors(app, FastAPI.openapi(app))


def _csp(html: str) -> str:
    """A Content-Security-Policy for a docs page: its one inline script (by hash) and this server only."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    sources = " ".join(["'self'"] + ["'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                                     for s in scripts])
    # Swagger UI and ReDoc set inline styles and draw icons from data: URLs; ReDoc runs its search in a blob: worker.
    return (f"default-src 'none'; script-src {sources}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _page(response: HTMLResponse) -> HTMLResponse:
    html = response.body.decode()
    return HTMLResponse(html, headers={"Content-Security-Policy": _csp(html), "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs`` (Swagger UI) and ``/redoc`` from local files, and publish the completed contract.

    The app must be created with ``docs_url=None, redoc_url=None`` (FastAPI's own pages load from a CDN).
    """
    app.mount(ASSETS_URL, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
    favicon = f"{ASSETS_URL}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _page(get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI", oauth2_redirect_url=None,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css", swagger_favicon_url=root + favicon,
            # validatorUrl None: no badge fetched from validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return _page(get_redoc_html(openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
                                    redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                                    redoc_favicon_url=root + favicon, with_google_fonts=False))

    app.openapi = lambda: contract_openapi(app)  # type: ignore[method-assign]
