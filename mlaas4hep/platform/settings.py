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
    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API")
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
    ray_address: str | None = Field(
        default=None, description="Ray cluster to use instead of starting a local head"
    )
    dashboard_url: str | None = Field(
        default=None, description="Ray dashboard/Jobs API URL (default from host and port)"
    )
    public_url: str | None = Field(
        default=None, description="URL clients use to reach the API (default from host/port)"
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
    user_quota_bytes: int = Field(
        default=20 * 1024**3, ge=1, description="Storage one user's uploads may take in total"
    )
    max_active_pipelines: int = Field(
        default=4, ge=1, description="Pending or running pipelines one user may have"
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

    @field_validator("oidc_issuer", "allowed_groups", "admin_groups", mode="before")
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
