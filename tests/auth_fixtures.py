"""Test helpers for tokens: real issuers on a loopback HTTP server, and forged JWTs.

:class:`IssuerServer` runs uvicorn in a thread and mounts the real issuer endpoints
(:func:`mlaas4hep.serve.apps.issuer_app.create_issuer_api`) of several
:class:`~mlaas4hep.auth.issuer.LocalIssuer` at ``http://127.0.0.1:<port>/<name>``,
counting the requests per path so tests can see when keys are fetched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import free_port
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from mlaas4hep.auth.issuer import LocalIssuer
from mlaas4hep.auth.oidc import AuthConfig, AuthError, Principal, TokenValidator


class IssuerServer:
    """Issuers served over real HTTP on loopback; add more while it runs."""

    def __init__(self, key_root: Path) -> None:
        self.key_root = key_root
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.requests: Counter[str] = Counter()
        self._router = Starlette(routes=[])
        self._server = uvicorn.Server(
            uvicorn.Config(
                self._app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="off",
                interface="asgi3",
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests[scope["path"]] += 1
        await self._router(scope, receive, send)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add_issuer(self, name: str, audience: str = "mlaas4hep") -> LocalIssuer:
        """A new issuer ``<base_url>/<name>`` with its own key folder."""
        issuer = LocalIssuer(self.key_root / name, self.url(name), audience)
        self.mount(name, issuer)
        return issuer

    def mount(self, name: str, issuer: LocalIssuer) -> None:
        """Serve ``issuer``'s endpoints at ``<base_url>/<name>`` (its own URL or not)."""
        # Imported here: importing Ray before the session's Ray fixtures configure its
        # token authentication would leave the driver without the token.
        from mlaas4hep.serve.apps.issuer_app import create_issuer_api

        self._router.router.routes.append(Mount(f"/{name}", app=create_issuer_api(issuer)))

    def mount_app(self, prefix: str, app: Any) -> None:
        """Serve any ASGI ``app`` at ``<base_url><prefix>``."""
        self._router.router.routes.append(Mount(prefix, app=app))

    def jwks_fetches(self, name: str) -> int:
        return self.requests[f"/{name}/jwks"]

    def start(self) -> IssuerServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"issuer test server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def issuer_server(
    tmp_path_factory: pytest.TempPathFactory, platform_settings
) -> Iterator[IssuerServer]:
    """An :class:`IssuerServer` for the test module; stopped at its end.

    Asks for ``platform_settings`` so Ray's token settings are in the environment before
    the issuer endpoints import Ray.
    """
    server = IssuerServer(tmp_path_factory.mktemp("issuers")).start()
    yield server
    server.stop()


def make_validator(*issuers: LocalIssuer | str, **config: Any) -> TokenValidator:
    """A validator trusting ``issuers`` (objects or URLs), with ``config`` overrides."""
    urls = [i if isinstance(i, str) else i.issuer_url for i in issuers]
    return TokenValidator(AuthConfig(issuers=urls, **config))


def validate(validator: TokenValidator, token: str | None) -> Principal:
    """Run :meth:`TokenValidator.validate` to completion."""
    return asyncio.run(validator.validate(token))


def refusal(validator: TokenValidator, token: str | None) -> AuthError:
    """The :class:`AuthError` ``validator`` raises for ``token`` (fails if none)."""
    with pytest.raises(AuthError) as info:
        validate(validator, token)
    return info.value


def b64url(data: bytes | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and the raw signature segment of a compact JWT."""
    head, body, signature = token.split(".")

    def load(segment: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))

    return load(head), load(body), signature


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWT with exactly these parts (no real signing)."""
    return f"{b64url(header)}.{b64url(claims)}.{b64url(signature) if signature else ''}"
