"""Platform settings: where things live and who is trusted, from the environment.

Every setting has an ``MLAAS4HEP_*`` environment variable, and the same key (lower
case, without the prefix) can be set in a YAML config file named by
``MLAAS4HEP_CONFIG`` (default ``~/.mlaas4hep/config.yaml``). The environment wins
over the file, the file over the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator

ENV_PREFIX = "MLAAS4HEP_"


def default_home() -> Path:
    """The folder of the embedded default: config, state and, by default, storage."""
    return Path(os.environ.get("MLAAS4HEP_HOME", Path.home() / ".mlaas4hep"))


def _csv(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item).strip() for item in value]


class Settings(BaseModel):
    """Typed platform configuration (see the module docstring for sources)."""

    home: str = Field(
        default_factory=lambda: str(default_home()),
        description="Folder of the embedded default's state and built-in issuer key",
    )
    storage: str = Field(
        default_factory=lambda: str(default_home() / "storage"),
        description="Root URI of runs, models and uploads: a folder, file://, s3://...",
    )
    shared_data_roots: list[str] = Field(
        default_factory=list,
        description="Local folders and storage prefixes (s3://bucket/prefix) that every "
        "tenant's specs may read, read-only (e.g. a CMS Open Data mount); comma separated",
    )
    allowed_data_hosts: list[str] = Field(
        default_factory=list,
        description="Remote data servers specs may read from, as scheme://host[:port] "
        "(e.g. root://xcache:1094; no port means the scheme's default); empty allows none "
        "but the MLAAS4HEP_REDIRECTOR host; comma separated",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API")
    grpc_port: int = Field(
        default=9000,
        ge=0,
        le=65535,
        description="Port of the KServe v2 gRPC service (inference.GRPCInferenceService), "
        "served by the inference app's ingress replicas; 0 turns it off",
    )
    grpc_host: str | None = Field(
        default=None,
        description="Address the KServe v2 gRPC service listens on (default: 'host'; "
        "0.0.0.0 in a cluster's pods)",
    )
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    ray_port: int = Field(default=6379, ge=1, le=65535, description="GCS port of the local head")
    num_cpus: int | None = Field(
        default=None, description="Logical CPUs of the local head (default: max(4, cores))"
    )
    serve_proxy: Literal["haproxy", "python"] = Field(
        default="haproxy",
        description="HTTP proxy of the local head's Serve apps: 'haproxy' (HAProxy in front "
        "of ingress replicas serving HTTP themselves) or 'python' (Ray Serve's own proxy)",
    )
    worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Nice value of the local head's Ray worker processes (Serve replicas, "
        "HAProxy, pipeline workers); Ray's own default, 15, lets any other busy process on "
        "the machine (a load tool, a plain web server) take the CPU from the Serve replicas",
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to use instead of starting a local head"
    )
    dashboard_url: str | None = Field(
        default=None, description="Ray dashboard/Jobs API URL (default from host and port)"
    )
    public_url: str | None = Field(
        default=None, description="URL clients use to reach the API (default from host/port)"
    )
    job_backend: Literal["ray-jobs", "rayjob"] = Field(
        default="ray-jobs",
        description="How pipelines run: 'ray-jobs' (Ray Jobs on the platform's own cluster, "
        "the laptop default) or 'rayjob' (one KubeRay RayJob per pipeline, in pods that hold "
        "no platform secret; see docs/security.md)",
    )
    kubernetes_api_url: str = Field(
        default="https://kubernetes.default.svc",
        description="Kubernetes API server the 'rayjob' backend creates RayJobs on",
    )
    kubernetes_namespace: str | None = Field(
        default=None,
        description="Namespace of the RayJobs (default: the service account's own namespace)",
    )
    rayjob_image: str | None = Field(
        default=None, description="Container image of the pipeline RayJobs' pods (required)"
    )
    rayjob_gpu_image: str | None = Field(
        default=None, description="Image of the GPU worker pods of a RayJob (default: rayjob_image)"
    )
    rayjob_service_account: str = Field(
        default="mlaas4hep-pipeline",
        description="Service account of the pipeline pods: no token mounted, no secrets",
    )
    rayjob_storage_claim: str = Field(
        default="mlaas4hep-storage",
        description="PersistentVolumeClaim holding the storage folder; a RayJob mounts only its "
        "run's folder of it read-write and its owner's uploads read-only",
    )
    rayjob_storage_mount: str = Field(
        default="/data", description="Where that claim is mounted in the platform's pods"
    )
    rayjob_ttl_seconds: int = Field(
        default=86400,
        ge=60,
        description="Seconds a finished RayJob is kept (its cluster is deleted at once)",
    )
    rayjob_head_cpus: int = Field(
        default=2, ge=1, le=64, description="CPUs of a RayJob's head pod (driver, read tasks)"
    )
    rayjob_memory_per_cpu_gib: float = Field(
        default=4.0, gt=0, le=64, description="Memory (GiB) a RayJob pod gets per CPU"
    )
    rayjob_seccomp_profile: str = Field(
        default="RuntimeDefault",
        description="Seccomp profile of the pipeline pods: 'RuntimeDefault' or 'localhost/<file>'"
        " (a node profile that allows the user namespaces bubblewrap needs)",
    )
    rayjob_pod_user_namespace: bool = Field(
        default=False,
        description="Run the pipeline pods in a user namespace of their own (hostUsers: false) "
        "with an unmasked /proc, which bubblewrap needs to mount /proc inside a container "
        "(Kubernetes with user namespace support on the nodes)",
    )
    oidc_issuer: list[str] = Field(
        default_factory=list, description="Trusted token issuers; empty uses the built-in one"
    )
    oidc_audience: str = Field(default="mlaas4hep", description="Audience tokens must name")
    allowed_groups: list[str] = Field(
        default_factory=list, description="Groups allowed to use the service; empty allows all"
    )
    admin_groups: list[str] = Field(default_factory=lambda: ["/mlaas4hep/admins"])
    token: str | None = Field(default=None, description="Bearer token used by the CLI client")
    max_upload_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Largest single uploaded file or archive"
    )
    max_request_bytes: int = Field(
        default=8 * 1024**2,
        ge=1,
        description="Largest request body of every route but uploads (JSON API calls, "
        "/json, /events, /proto, /image, KServe infer), enforced while the body streams",
    )
    user_quota_bytes: int = Field(
        default=20 * 1024**3,
        ge=1,
        description="Storage one user's work may take in total: uploads, pipeline runs "
        "(multipart inputs, artifacts, checkpoints), owned model versions, predictions",
    )
    max_active_pipelines: int = Field(
        default=4, ge=1, description="Pending or running pipelines one user may have"
    )
    reconcile_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="How often the pipeline API settles runs whose job ended or was lost "
        "(head restart, lost submission) with the cluster's view of their jobs",
    )
    reconcile_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a pending run may wait for its job to appear before it is "
        "submitted again (a head that has just started takes up to a minute to accept jobs)",
    )
    max_workers_per_pipeline: int = Field(
        default=8, ge=1, description="Training workers one pipeline may ask for"
    )
    max_cpus_per_pipeline: float = Field(
        default=16.0, gt=0, description="CPUs one pipeline may ask for (workers x cpus)"
    )
    max_gpus_per_pipeline: float = Field(
        default=1.0, ge=0, description="GPUs one pipeline may ask for (workers x gpus)"
    )
    max_custom_resources_per_pipeline: float = Field(
        default=8.0,
        ge=0,
        description="Units of each custom Ray resource one pipeline may ask for: workers x "
        "resources_per_worker, and each read task's read_resources",
    )
    model_sandbox: Literal["bwrap", "none"] = Field(
        default="bwrap",
        description="Where a pipeline's model.py runs: 'bwrap' (a bubblewrap sandbox: no "
        "network, read-only system, no platform home, Ray token, storage or host /tmp; "
        "Debian package bubblewrap) or 'none' (a plain child process with a clean "
        "environment but the platform's file and network rights: only for deployments where "
        "the pod running user code holds no secret and reaches no other tenant's data)",
    )
    sandbox_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds model(idim) may take in the sandbox, TensorFlow's import included",
    )
    sandbox_max_output_bytes: int = Field(
        default=512 * 1024**2,
        ge=1,
        description="Largest model archive (config + weights) the model sandbox may hand back",
    )
    allowed_model_layers: list[str] = Field(
        default_factory=list,
        description="Layer class names (comma separated) a user's model file may use beyond "
        "the built-in Keras ones; each must be installed and registered with Keras on the "
        "platform. 'Lambda' turns safe mode off for every model load: it runs code stored "
        "in users' files (see docs/security.md)",
    )

    @field_validator(
        "oidc_issuer",
        "allowed_groups",
        "admin_groups",
        "shared_data_roots",
        "allowed_data_hosts",
        "allowed_model_layers",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: Any) -> list[str]:
        return _csv(value)

    @property
    def api_url(self) -> str:
        """Base URL of the HTTP API, as clients reach it."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return f"http://{host}:{self.port}"

    @property
    def grpc_address(self) -> str | None:
        """``host:port`` of the KServe v2 gRPC service as local clients reach it (None: off)."""
        if not self.grpc_port:
            return None
        host = self.grpc_host or self.host
        host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
        return f"{host}:{self.grpc_port}"

    @property
    def jobs_url(self) -> str:
        """URL of Ray's dashboard and Jobs API."""
        return (self.dashboard_url or f"http://127.0.0.1:{self.dashboard_port}").rstrip("/")

    @property
    def builtin_issuer_url(self) -> str:
        """Issuer URL of the built-in token issuer served by the embedded platform."""
        return f"{self.api_url}/issuer"

    @property
    def uses_builtin_issuer(self) -> bool:
        return not self.oidc_issuer

    @property
    def trusted_issuers(self) -> list[str]:
        return self.oidc_issuer or [self.builtin_issuer_url]

    @property
    def state_dir(self) -> Path:
        """Where ``mlaas4hep up`` records what it started."""
        return Path(self.home) / "state"

    @property
    def issuer_key_dir(self) -> Path:
        """Where the built-in issuer keeps its signing keys."""
        return Path(self.home) / "issuer"


def config_file() -> Path:
    return Path(os.environ.get("MLAAS4HEP_CONFIG", default_home() / "config.yaml"))


def load_settings(**overrides: Any) -> Settings:
    """Settings from defaults, then the config file, then ``MLAAS4HEP_*``, then ``overrides``."""
    values: dict[str, Any] = {}
    path = config_file()
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must be a mapping of keys to values")
        values.update({str(k).lower(): v for k, v in data.items()})
    for name in Settings.model_fields:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None and env != "":
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(values)


def as_settings(value: Settings | dict[str, Any] | None) -> Settings:
    """Settings from what a Serve application builder receives.

    ``None`` loads them from the environment; a mapping (the ``args`` of a Serve config)
    overrides the loaded ones key by key.
    """
    if isinstance(value, Settings):
        return value
    return load_settings(**(value or {}))
