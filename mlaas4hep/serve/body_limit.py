"""A bound on every HTTP request body, enforced while the body streams in.

:class:`BodyLimit` is plain ASGI middleware that every app of the platform installs
(:func:`install_body_limit`). It picks the limit of a request from its method and path
(upload routes get the upload limit, every other route the smaller request limit),
answers 413 at once when a ``Content-Length`` announces more, and otherwise counts the
bytes of each ``http.request`` message as it arrives: the message that passes the limit
never reaches the app, which sees an error from ``receive`` instead, and the client gets
413 ``{"error": "... limit of N bytes"}``. A chunked body without a length is bounded
the same way, so no route can spool more than its limit to the replica's temporary
folder or to storage.

The middleware runs inside the app, so it sits in front of every route whichever way a
request arrives: through Ray Serve's proxy, straight from HAProxy to the replica's own
HTTP server (direct ingress), or in plain ASGI tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlaas4hep.serve.errors import error_response

#: Room for the multipart framing (boundaries, part headers) around uploaded files.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodyTooLarge(MultiPartException):
    """Raised by ``receive`` once a body passes its limit.

    A :class:`~starlette.formparsers.MultiPartException`, so that Starlette's form parser
    closes the temporary files it spooled when it sees it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class BodyLimits:
    """The body limit of each request: ``default``, or the limit of the first rule in
    ``routes`` whose method and path pattern (relative to the app's root) match."""

    default: int
    routes: tuple[tuple[str, re.Pattern[str], int], ...] = field(default=())

    @classmethod
    def of(
        cls,
        default: int,
        upload_bytes: int = 0,
        upload_routes: Iterable[str] = (),
        raw_upload_routes: Iterable[str] = (),
    ) -> BodyLimits:
        """Limits of ``default`` bytes; ``upload_bytes`` plus the multipart framing on
        each ``"METHOD /path-regex"`` of ``upload_routes``; exactly ``upload_bytes`` on
        each route of ``raw_upload_routes``, whose body is the file itself."""
        rules = [
            (*_route(route), upload_bytes + MULTIPART_OVERHEAD_BYTES) for route in upload_routes
        ]
        rules += [(*_route(route), upload_bytes) for route in raw_upload_routes]
        return cls(default, tuple(rules))

    def limit(self, method: str, path: str) -> int:
        """Bytes a ``method`` request to ``path`` may send."""
        for rule_method, pattern, limit in self.routes:
            if rule_method == method and pattern.fullmatch(path):
                return limit
        return self.default


def _route(route: str) -> tuple[str, re.Pattern[str]]:
    """The method and compiled path pattern of a ``"METHOD /path-regex"`` rule."""
    method, _, pattern = route.partition(" ")
    return method.upper(), re.compile(pattern)


def app_path(scope: Scope) -> str:
    """The request's path below the app's mount point (Serve route prefix or ASGI mount)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def declared_length(scope: Scope) -> int | None:
    """The ``Content-Length`` of the request, ``None`` when it sends none (chunked)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimit:
    """ASGI middleware refusing (413) a request body the moment it passes its limit."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.limit(scope["method"], app_path(scope))
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, send, limit)
            return
        received = 0
        tripped = False
        started = False

        async def counted() -> Message:
            nonlocal received, tripped
            if tripped:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the app's answer to the error; the 413 goes out instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not tripped:
                raise
        if tripped and not started:
            await _refuse(scope, send, limit)


async def _refuse(scope: Scope, send: Send, limit: int) -> None:
    """Send the 413 answer naming the route and the limit."""
    what = f"{scope['method']} {app_path(scope)}"
    # No "Connection: close": the server reads and drops the rest of the body, so the
    # client, still sending, gets this answer instead of a reset connection.
    response = error_response(413, f"{what}: request body over the limit of {limit} bytes")

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


def install_body_limit(
    app: FastAPI,
    default: int,
    upload_bytes: int = 0,
    upload_routes: Iterable[str] = (),
    raw_upload_routes: Iterable[str] = (),
) -> None:
    """Bound every request body of ``app`` (see :meth:`BodyLimits.of` for the arguments)."""
    limits = BodyLimits.of(default, upload_bytes, upload_routes, raw_upload_routes)
    app.add_middleware(BodyLimit, limits=limits)
