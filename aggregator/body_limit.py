"""Every request body is bounded before any route reads it.

FastAPI reads a JSON body whole, and parses it, before any dependency runs (the admin check included), so a limit
inside a route or a dependency comes too late: one unauthenticated ``POST /enroll`` of a few GB would fill the
server's memory. :class:`BodyLimit` is an ASGI middleware that refuses a body with 413 (the usual error body) as
soon as it passes its route's limit, declared (``Content-Length``) or streamed:

- a route that takes JSON: the middleware reads the body first, at most :data:`JSON_BODY_LIMIT`, and hands the
  route the bytes it read;
- a route that takes a safetensors file (it depends on :func:`aggregator.deps.read_body`): at most
  ``max_upload_mb``, counted while the route reads it, so the route's token check runs before a byte is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import dependants, read_body
from .errors import PayloadTooLarge, error_body

#: The largest body of a route that takes JSON (a federation's configuration, an enrollment: a few hundred bytes).
JSON_BODY_LIMIT = 64 * 2**10


def route_limits(app: FastAPI, upload_bytes: int) -> Callable[[Scope], tuple[int, bool]]:
    """``limit_for(scope) -> (limit, takes_file)``: ``(upload_bytes, True)`` for a request to a route that reads a
    safetensors body, else ``(JSON_BODY_LIMIT, False)``. Call it once every router is included."""
    raw = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute) and any(d.call is read_body for d in dependants(route.dependant)):
            raw.append((compile_path(context.path)[0], context.methods or set()))

    def limit_for(scope: Scope) -> tuple[int, bool]:
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        takes_file = any(regex.fullmatch(path) and scope["method"] in methods for regex, methods in raw)
        return (upload_bytes, True) if takes_file else (JSON_BODY_LIMIT, False)

    return limit_for


class BodyLimit:
    """ASGI middleware: refuse each HTTP request's body with 413 past ``limit_for(scope)`` (see the module)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], tuple[int, bool]]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, takes_file = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
            return
        if takes_file:
            await self.app(scope, _counted(receive, limit), send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(send, f"body exceeds the limit of {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, for a streaming answer

        await self.app(scope, replay, send)


def _counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises :class:`PayloadTooLarge` (answered with 413 by the app) once the body passes
    ``limit`` bytes."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        return message

    return counted


async def _refuse(send: Send, message: str) -> None:
    err = PayloadTooLarge(message)
    content = json.dumps(error_body(err)).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": content})
