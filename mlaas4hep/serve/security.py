"""FastAPI glue for bearer-token authentication (:mod:`mlaas4hep.auth.oidc`).

Usage::

    validator = TokenValidator.from_settings(settings)
    Submitter = Annotated[Principal, Depends(principal_dependency(validator, "submit"))]

    @app.post("/api/v1/pipelines")
    async def submit(principal: Submitter): ...

Refusals raise :class:`~mlaas4hep.serve.errors.ApiError`, so routes of an app with
:func:`~mlaas4hep.serve.errors.install_error_handlers` answer ``{"error": "..."}`` with
401 (and an RFC 6750 ``WWW-Authenticate: Bearer ...`` header), 403 or 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mlaas4hep.auth.oidc import ACTIONS, AuthError, Principal, TokenValidator
from mlaas4hep.serve.errors import ApiError

REALM = "mlaas4hep"

# Declares the bearer scheme in the OpenAPI document; the header is parsed below so
# that a wrong scheme gets its own message.
bearer_scheme = HTTPBearer(auto_error=False, description="OAuth2/OIDC access token (JWT)")


def _quoted(text: str) -> str:
    """``text`` as an RFC 7230 quoted-string value (no quotes, backslashes or newlines)."""
    return "".join(c for c in text if c.isprintable() and c not in '"\\')


def www_authenticate(error: AuthError | None = None) -> str:
    """The ``WWW-Authenticate`` value for a refused request (RFC 6750 section 3)."""
    parts = [f'Bearer realm="{REALM}"']
    if error is not None and error.error:
        parts.append(f'error="{error.error}"')
        parts.append(f'error_description="{_quoted(error.message)}"')
        if error.scope:
            parts.append(f'scope="{_quoted(error.scope)}"')
    return ", ".join(parts)


def api_error(error: AuthError) -> ApiError:
    """The HTTP answer to an :class:`AuthError`."""
    headers = None
    if error.status_code == 401 or error.error == "insufficient_scope":
        headers = {"WWW-Authenticate": www_authenticate(error)}
    return ApiError(error.status_code, error.message, headers)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization`` header value; :class:`AuthError` (401) otherwise."""
    if not authorization or not authorization.strip():
        raise AuthError(401, "missing bearer token")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(
            401,
            "the Authorization header must use the Bearer scheme",
            error="invalid_request",
        )
    if not token.strip():
        raise AuthError(401, "missing bearer token")
    return token.strip()


def principal_dependency(
    validator: TokenValidator, action: str = "use"
) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency returning the caller's :class:`Principal`, validated and
    authorized for ``action`` (``use``, ``submit`` or ``admin``)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")

    async def principal(
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    ) -> Principal:
        try:
            token = bearer_token(request.headers.get("authorization"))
            return await validator.authenticate(token, action)  # type: ignore[arg-type]
        except AuthError as err:
            raise api_error(err) from None

    return principal
