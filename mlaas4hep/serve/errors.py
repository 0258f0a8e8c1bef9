"""One error shape for every HTTP route: ``{"error": "..."}`` with a 4xx or 5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlaas4hep.store.storage import LockTimeout, StorageFull

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Make ``app`` answer every error as ``{"error": ...}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(StorageFull)
    async def _storage_full(_: Request, exc: StorageFull) -> JSONResponse:
        logger.error("storage full: %s", exc)  # the message names storage paths: logged only
        return error_response(507, "the platform's storage has no room for this request")

    @app.exception_handler(LockTimeout)
    async def _busy(_: Request, exc: LockTimeout) -> JSONResponse:
        logger.warning("lock wait timed out: %s", exc)
        return error_response(
            503, "another request is changing the same record: retry", {"Retry-After": "1"}
        )

    @app.exception_handler(ConnectionError)
    async def _unreachable(_: Request, exc: ConnectionError) -> JSONResponse:
        logger.warning("a backend is unreachable: %s", exc)
        return error_response(503, "the cluster or the storage is unreachable: retry later")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")
