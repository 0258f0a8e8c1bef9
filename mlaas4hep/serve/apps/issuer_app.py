"""HTTP endpoints of the built-in token issuer, as a Ray Serve application.

Served at :data:`ISSUER_ROUTE_PREFIX` of the platform's HTTP proxy, so the issuer URL
is ``http://host:port/issuer`` (``Settings.builtin_issuer_url``)::

    GET /issuer/.well-known/openid-configuration     OIDC discovery
    GET /issuer/jwks                                 public signing keys (JWK Set)

Only public material leaves the replica: the signing keys stay in the key folder,
where ``mlaas4hep token`` reads them to mint tokens. The replica rereads the key file
when it changes, so a rotation by the CLI shows in ``/jwks`` at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

from mlaas4hep.auth.issuer import LocalIssuer
from mlaas4hep.serve.body_limit import install_body_limit
from mlaas4hep.serve.errors import install_error_handlers
from mlaas4hep.settings import Settings, as_settings

ISSUER_APP_NAME = "issuer"
ISSUER_ROUTE_PREFIX = "/issuer"

# Validators cache keys themselves and refresh on an unknown kid; a short cache here
# only spares repeated fetches by other clients.
_CACHE_CONTROL = {"Cache-Control": "public, max-age=60"}


def create_issuer_api(issuer: LocalIssuer, max_body_bytes: int = 0) -> FastAPI:
    """A FastAPI app serving ``issuer``'s discovery document and JWKS; its routes take
    no body, so a request sending more than ``max_body_bytes`` gets 413."""
    app = FastAPI(
        title="mlaas4hep token issuer",
        description="OIDC discovery and public keys of the platform's built-in issuer",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    install_body_limit(app, max_body_bytes)

    @app.get("/.well-known/openid-configuration")
    async def openid_configuration() -> JSONResponse:
        return JSONResponse(issuer.openid_configuration(), headers=_CACHE_CONTROL)

    @app.get("/jwks")
    async def jwks() -> JSONResponse:
        return JSONResponse(
            issuer.jwks(), headers=_CACHE_CONTROL, media_type="application/jwk-set+json"
        )

    return app


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, num_replicas=1)
@serve.ingress()
class IssuerApp:
    """One replica serving the issuer whose keys are in ``key_dir``."""

    def __init__(self, key_dir: str, issuer_url: str, audience: str) -> None:
        self.issuer = LocalIssuer(key_dir, issuer_url, audience)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_issuer_api(self.issuer)


def build_issuer_app(settings: Settings | dict[str, Any] | None = None) -> serve.Application:
    """The issuer application of ``settings`` (import path for Serve configs).

    Takes :class:`Settings`, the ``args`` mapping of a Serve config, or ``None`` for the
    environment's settings. The key folder is resolved here, in the caller's
    environment, and passed to the replica. Run it with ``serve.run(app,
    name=ISSUER_APP_NAME, route_prefix=ISSUER_ROUTE_PREFIX)``.
    """
    settings = as_settings(settings)
    key_dir = Path(settings.issuer_key_dir).expanduser().resolve()
    return IssuerApp.bind(str(key_dir), settings.builtin_issuer_url, settings.oidc_audience)
