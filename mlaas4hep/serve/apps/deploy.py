"""The Serve applications of the platform, in one list used by every deployment path.

``mlaas4hep up`` deploys them on the local head; ``mlaas4hep serve-config`` writes the same
list as a Serve config (the RayService manifest embeds it), so laptop and cluster run the
same applications with the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlaas4hep.settings import Settings


@dataclass(frozen=True)
class AppSpec:
    """One Serve application: its name, route prefix and builder's import path."""

    name: str
    route_prefix: str
    import_path: str


#: The built-in issuer is deployed only when no external issuer is configured.
ISSUER_APP = AppSpec("issuer", "/issuer", "mlaas4hep.serve.apps.issuer_app:build_issuer_app")
API_APP = AppSpec("api", "/api/v1", "mlaas4hep.serve.apps.pipeline_api:build_api_app")
TFAAS_APP = AppSpec("tfaas", "/", "mlaas4hep.serve.apps.inference:build_tfaas_app")
MLAAS4HEP_SERVER_APP = AppSpec(
    "mlaas4hep_server",
    "/mlaas4hep",
    "mlaas4hep.serve.apps.mlaas4hep_server:build_mlaas4hep_server_app",
)


def applications(settings: Settings) -> list[AppSpec]:
    """The applications to run under ``settings``."""
    apps = [API_APP, MLAAS4HEP_SERVER_APP, TFAAS_APP]
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
    # In one call: the replicas of every application start together.
    serve.run_many(
        [
            serve.RunTarget(
                _builder(app.import_path)(settings), name=app.name, route_prefix=app.route_prefix
            )
            for app in applications(settings)
        ]
    )
    return [app.name for app in applications(settings)]


#: Replica ranges of the inference service on a Kubernetes cluster (TFaaSOptions fields).
KUBERNETES_TFAAS_ARGS: dict[str, Any] = {
    "ingress_max_replicas": 4,
    "model_max_replicas": 8,
    "model_cpus": 1.0,
}
#: Autoscaling of the pipeline API's deployment on a Kubernetes cluster.
KUBERNETES_API_DEPLOYMENTS: list[dict[str, Any]] = [
    {
        "name": "PipelineAPI",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    }
]


def serve_config(settings: Settings, kubernetes: bool = False) -> dict[str, Any]:
    """A Serve config (``serveConfigV2``) holding every application.

    The embedded default passes its settings as each application's ``args``. With
    ``kubernetes=True`` the settings come from the pods' environment instead (a ConfigMap
    and the issuer's Secret), the built-in issuer is left out (an external one is
    configured), and only the cluster's replica ranges are written.
    """
    if kubernetes:
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": [
                _application(
                    app,
                    dict(KUBERNETES_TFAAS_ARGS) if app is TFAAS_APP else {},
                    KUBERNETES_API_DEPLOYMENTS if app is API_APP else None,
                )
                for app in applications(settings)
                if app is not ISSUER_APP
            ],
        }
    args = settings.model_dump(
        include={
            "storage",
            "oidc_issuer",
            "oidc_audience",
            "allowed_groups",
            "admin_groups",
            "max_upload_bytes",
            "max_request_bytes",
            "user_quota_bytes",
            "max_active_pipelines",
            "max_workers_per_pipeline",
            "max_cpus_per_pipeline",
            "max_gpus_per_pipeline",
            "reconcile_interval_s",
            "reconcile_grace_s",
        }
    )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.port},
        "applications": [_application(a, args) for a in applications(settings)],
    }


def _application(
    app: AppSpec, args: dict[str, Any], deployments: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": app.name,
        "route_prefix": app.route_prefix,
        "import_path": app.import_path,
        "args": args,
    }
    if deployments:
        entry["deployments"] = deployments
    return entry
