"""The Serve applications of the platform, in one list used by every deployment path.

``mlaas4hep up`` deploys them on the local head; ``mlaas4hep serve-config`` writes the same
list as a Serve config (the RayService manifest embeds it), so laptop and cluster run the
same applications with the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlaas4hep.platform.settings import Settings


@dataclass(frozen=True)
class AppSpec:
    """One Serve application: its name, route prefix and builder's import path."""

    name: str
    route_prefix: str
    import_path: str


#: The built-in issuer is deployed only when no external issuer is configured.
ISSUER_APP = AppSpec("issuer", "/issuer", "mlaas4hep.serve.issuer_app:build_issuer_app")
API_APP = AppSpec("api", "/api/v1", "mlaas4hep.serve.pipeline_api:build_api_app")
TFAAS_APP = AppSpec("tfaas", "/", "mlaas4hep.serve.tfaas:build_tfaas_app")


def applications(settings: Settings) -> list[AppSpec]:
    """The applications to run under ``settings``."""
    apps = [API_APP, TFAAS_APP]
    return [ISSUER_APP, *apps] if settings.uses_builtin_issuer else apps


def _builder(import_path: str):
    import importlib

    module, attr = import_path.split(":")
    return getattr(importlib.import_module(module), attr)


def deploy(settings: Settings) -> list[str]:
    """Start Serve's HTTP proxy on ``settings.host:port`` and run every application.

    Needs a connected Ray driver (``ray.init``). Returns the names deployed.
    """
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    for app in applications(settings):
        builder = _builder(app.import_path)
        serve.run(builder(settings), name=app.name, route_prefix=app.route_prefix)
    return [app.name for app in applications(settings)]


def serve_config(settings: Settings) -> dict[str, Any]:
    """A Serve config (``serveConfigV2``) holding every application."""
    args = settings.model_dump(
        include={"storage", "oidc_issuer", "oidc_audience", "allowed_groups", "admin_groups"}
    )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.port},
        "applications": [
            {
                "name": a.name,
                "route_prefix": a.route_prefix,
                "import_path": a.import_path,
                "args": args,
            }
            for a in applications(settings)
        ],
    }
