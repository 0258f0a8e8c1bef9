"""HTTP client of the platform's APIs, used by the CLI and by scripts.

:class:`PlatformClient` speaks to the pipeline API (``/api/v1``) and the TFaaS routes
with a bearer token; every non-2xx answer becomes a :class:`ClientError` carrying the
server's ``{"error": ...}`` message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from mlaas4hep.platform.config import PipelineSpec
from mlaas4hep.platform.settings import Settings


class ClientError(RuntimeError):
    """The platform refused a request, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def resolve_token(settings: Settings, token: str | None = None, user: str | None = None) -> str:
    """A bearer token: ``token``, ``MLAAS4HEP_TOKEN``, ``<home>/token``, or one minted locally.

    Minting needs the built-in issuer's key in this machine's platform home (the
    embedded default); with an external issuer, use ``mlaas4hep login`` or the variable.
    """
    if token:
        return token
    if settings.token:
        return settings.token
    saved = Path(settings.home) / "token"
    if saved.is_file() and saved.read_text().strip():
        return saved.read_text().strip()
    if settings.uses_builtin_issuer and settings.issuer_key_dir.is_dir():
        from mlaas4hep.platform.issuer import builtin_issuer

        return builtin_issuer(settings).mint(user or default_user())
    raise ClientError("no token: set MLAAS4HEP_TOKEN or run 'mlaas4hep token' on the platform host")


def default_user() -> str:
    import getpass

    return getpass.getuser()


class PlatformClient:
    """Calls the platform's HTTP APIs at ``base_url`` with ``token``."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ClientError(f"cannot reach {self.base_url}{path}: {error}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise ClientError(f"{response.status_code}: {message}", response.status_code)
        return response

    def submit(self, spec: PipelineSpec | dict[str, Any], model_source: str | None = None) -> dict:
        """Submit a pipeline; a model file named by the spec is sent along with it."""
        if isinstance(spec, PipelineSpec):
            if spec.model.file and model_source is None:
                model_source = Path(spec.model.file).read_text()
            spec_data = spec.model_dump(mode="json")
            if isinstance(spec.nan, float) and spec.nan != spec.nan:
                spec_data["nan"] = "nan"
        else:
            spec_data = dict(spec)
        if model_source is not None:
            spec_data.pop("model", None)
        body = {"spec": spec_data, "model_source": model_source}
        return self._request("POST", "/api/v1/pipelines", json=body).json()

    def whoami(self) -> dict:
        """The caller as the platform sees them (subject, owner id, groups)."""
        return self._request("GET", "/api/v1/whoami").json()

    def pipelines(self) -> list[dict]:
        return self._request("GET", "/api/v1/pipelines").json()["pipelines"]

    def pipeline(self, run_id: str) -> dict:
        return self._request("GET", f"/api/v1/pipelines/{run_id}").json()

    def logs(self, run_id: str) -> str:
        return self._request("GET", f"/api/v1/pipelines/{run_id}/logs").text

    def artifact(self, run_id: str, name: str) -> bytes:
        return self._request("GET", f"/api/v1/pipelines/{run_id}/artifacts/{name}").content

    def cancel(self, run_id: str) -> dict:
        return self._request("POST", f"/api/v1/pipelines/{run_id}/cancel").json()

    def wait(
        self,
        run_id: str,
        on_update: Callable[[dict], None] | None = None,
        poll: float = 2.0,
        timeout: float = 3600.0,
    ) -> dict:
        """Poll a pipeline until it finishes; call ``on_update`` on each change."""
        deadline = time.monotonic() + timeout
        last: tuple | None = None
        while True:
            record = self.pipeline(run_id)
            key = (record["state"], record.get("stage"), str(record.get("progress")))
            if key != last and on_update is not None:
                on_update(record)
            last = key
            if record["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
                return record
            if time.monotonic() > deadline:
                raise ClientError(f"pipeline {run_id} still {record['state']} after {timeout} s")
            time.sleep(poll)

    def predict(
        self,
        model: str,
        values: Sequence[float] | Sequence[Sequence[float]],
        keys: Sequence[str] | None = None,
    ) -> list:
        """TFaaS ``/json`` prediction for one row or several."""
        body = {"keys": list(keys or []), "values": values, "model": model}
        return self._request("POST", "/json", json=body).json()

    def models(self) -> Any:
        return self._request("GET", "/models").json()
