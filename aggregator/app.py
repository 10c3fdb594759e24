"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .body_limit import BodyLimit, route_limits
from .docs import install_docs
from .errors import AggregatorError, DataDirLocked, error_body
from .lock import DataDirLock
from .routes import admin, devices, page, status
from .service import Federation
from .settings import Settings, check_secret
from .store import Store, new_token

log = logging.getLogger(__name__)


def admin_token(settings: Settings) -> str:
    """The configured admin token, else the one stored in ``data_dir/admin_token`` (created on first start)."""
    if settings.admin_token:
        return settings.admin_token
    path = settings.data_dir / "admin_token"
    if path.is_file():
        return path.read_text().strip()
    token = new_token(24)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    log.warning("generated an admin token in %s", path)
    return token


async def _tick(federation: Federation, every: float) -> None:
    """Close rounds whose deadline passed."""
    while True:
        await asyncio.sleep(every)
        try:
            await run_in_threadpool(federation.maybe_close)
        except Exception:  # keep ticking; the next tick retries
            log.exception("closing a round failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the aggregator app. State (database, blobs) opens in the lifespan and survives restarts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        """Lock the data directory (one server per folder), open the store, redo interrupted aggregations (never
        fatal: a round that cannot be aggregated ends ``failed``), tick deadlines."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = DataDirLock(settings.data_dir)
        except DataDirLocked as err:
            log.error("%s", err)
            raise
        try:
            token = admin_token(settings)
            try:
                check_secret(token, f"the admin token in {settings.data_dir / 'admin_token'}")
            except ValueError as err:
                log.error("%s", err)
                raise
            store = Store(settings.data_dir)
            federation = Federation(store)
            await run_in_threadpool(federation.recover)
            app.state.settings = settings
            app.state.federation = federation
            app.state.admin_token = token
            ticker = asyncio.create_task(_tick(federation, settings.tick_s))
            try:
                yield
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                store.close()
        finally:
            lock.release()

    # docs_url/redoc_url None: FastAPI's own pages load from a CDN; install_docs serves them from local files.
    app = FastAPI(title="CoMiGS aggregator", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Collects generalist (shared) adapter tensors from devices and serves their average. "
                              "Operator's page: [/](/) (configuration, rounds, metrics, devices). Every error "
                              "answer has the body `ErrorBody`. Authorize with the device token (from `POST "
                              "/enroll`) for device routes and the admin token for `/admin` routes.")

    @app.exception_handler(AggregatorError)
    async def domain_error(request: Request, err: AggregatorError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content=error_body(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": "invalid_request", "detail": str(err.errors()[:3]),
                                                      "extra": {}})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unknown path, a method a path does not take) in the same body."""
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(status_code=err.status_code, content={"error": code, "detail": str(err.detail),
                                                                  "extra": {}}, headers=err.headers)

    app.include_router(status.router)
    app.include_router(admin.router)
    app.include_router(devices.router)
    app.include_router(page.router)
    install_docs(app)
    app.add_middleware(BodyLimit, limit_for=route_limits(app, int(settings.max_upload_mb * 2**20)))
    return app
