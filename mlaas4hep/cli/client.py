"""HTTP client of the platform's APIs, used by the CLI and by scripts.

:class:`PlatformClient` speaks to the pipeline API (``/api/v1``) and the TFaaS routes
with a bearer token; every non-2xx answer becomes a :class:`ClientError` carrying the
server's ``{"error": ...}`` message.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from mlaas4hep.settings import Settings
from mlaas4hep.spec import PipelineSpec, split_names


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
        from mlaas4hep.auth.issuer import builtin_issuer

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
            self._raise(response)
        return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise ClientError(f"{response.status_code}: {message}", response.status_code)

    def submit(self, spec: PipelineSpec | dict[str, Any], model_source: str | None = None) -> dict:
        """Submit a pipeline; a model file named by the spec is sent along with it.

        Local files the spec reads (ROOT files, a ``specs`` or ``preproc`` file) are sent
        with it, as a multipart submission whose copies belong to the run: the platform
        reads no path of this machine. Branch-list files are read here. Remote URLs,
        ``uploads/<path>`` names (your uploaded files) and paths that are no local file are
        sent as they are, for the platform to check against what you may read.
        """
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
        spec_data, local = local_inputs(spec_data)
        if local:
            text = json.dumps(spec_data).encode()
            return self._submit_parts(("spec.json", text), model_source, local)
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

    def artifacts(self, run_id: str) -> list[str]:
        """Names of a pipeline's artifacts (JSON files, log, ``plots/*.png``)."""
        return self._request("GET", f"/api/v1/pipelines/{run_id}/artifacts").json()["artifacts"]

    def artifact(self, run_id: str, name: str) -> bytes:
        return self._request("GET", f"/api/v1/pipelines/{run_id}/artifacts/{name}").content

    def cancel(self, run_id: str) -> dict:
        return self._request("POST", f"/api/v1/pipelines/{run_id}/cancel").json()

    def resume(self, run_id: str) -> dict:
        """Run a cancelled or failed pipeline again, from its latest checkpoint."""
        return self._request("POST", f"/api/v1/pipelines/{run_id}/resume").json()

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

    # -- pipeline API: more of /api/v1 -----------------------------------------

    def delete(self, run_id: str) -> dict:
        """Delete a finished pipeline's record, logs and artifacts."""
        return self._request("DELETE", f"/api/v1/pipelines/{run_id}").json()

    def follow_logs(self, run_id: str) -> Iterator[str]:
        """A pipeline's log as it grows, until the pipeline finishes."""
        path = f"/api/v1/pipelines/{run_id}/logs"
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        with self.http.stream("GET", path, params={"follow": "true"}, timeout=timeout) as reply:
            if reply.status_code >= 400:
                reply.read()
                self._raise(reply)
            yield from reply.iter_text()

    def submit_files(
        self, spec: Path, model: Path | None = None, data: Sequence[Path] = ()
    ) -> dict:
        """Submit as a multipart form: the spec file, the model file, data files."""
        source = None if model is None else model.read_text()
        parts = {p.name: p for p in data}
        return self._submit_parts((spec.name, spec.read_bytes()), source, parts, model)

    def _submit_parts(
        self,
        spec: tuple[str, bytes],
        model_source: str | None,
        data: dict[str, Path],
        model: Path | None = None,
    ) -> dict:
        """``POST /pipelines/upload`` of the spec ``(file name, text)``, the model source
        and the local files ``data`` (part name → path), streamed from disk."""
        parts: list[tuple[str, tuple[str, Any]]] = [("spec", spec)]
        if model_source is not None:
            parts.append(("model", (model.name if model else "model.py", model_source.encode())))
        with contextlib.ExitStack() as stack:
            parts += [("data", (n, stack.enter_context(p.open("rb")))) for n, p in data.items()]
            return self._request("POST", "/api/v1/pipelines/upload", files=parts).json()

    def files(self) -> dict:
        """The caller's uploaded files and the quota used."""
        return self._request("GET", "/api/v1/files").json()

    def upload_file(self, local: Path, path: str | None = None) -> dict:
        """Stream ``local`` to the caller's files as ``path`` (default: its name)."""

        def chunks() -> Iterator[bytes]:
            with local.open("rb") as stream:
                while chunk := stream.read(1024 * 1024):
                    yield chunk

        return self._request("PUT", f"/api/v1/files/{path or local.name}", content=chunks()).json()

    def download_file(self, path: str) -> bytes:
        return self._request("GET", f"/api/v1/files/{path}").content

    def delete_file(self, path: str) -> dict:
        return self._request("DELETE", f"/api/v1/files/{path}").json()

    def registered_models(self, mine: bool = False) -> list[dict]:
        """Registered models the caller may use (``mine``: only their own)."""
        params = {"mine": "true"} if mine else None
        return self._request("GET", "/api/v1/models", params=params).json()["models"]

    def model_info(self, name: str) -> dict:
        return self._request("GET", f"/api/v1/models/{name}").json()

    def model_bundle(self, name: str, version: int | None = None) -> bytes:
        """A model's bundle as a TFaaS gzip tarball (latest version by default)."""
        where = f"/versions/{version}" if version is not None else ""
        return self._request("GET", f"/api/v1/models/{name}{where}/bundle").content

    def set_visibility(self, name: str, visibility: str, groups: list[str] | None = None) -> dict:
        body = {"visibility": visibility, "groups": groups}
        return self._request("PUT", f"/api/v1/models/{name}/visibility", json=body).json()

    # -- the MLaaS4HEP server's API (/mlaas4hep) --------------------------------

    def server_call(self, method: str, endpoint: str, **kwargs: Any) -> httpx.Response:
        """One call of the MLaaS4HEP server API (``/mlaas4hep/<endpoint>``)."""
        return self._request(method, f"/mlaas4hep/{endpoint}", **kwargs)


def _part_name(path: Path, taken: dict[str, Path]) -> str:
    """A multipart file name for ``path``: its name made upload-safe, unique in ``taken``."""
    name = re.sub(r"[^A-Za-z0-9_.+=@-]", "_", path.name).lstrip(".-") or "data"
    unique, number = name, 1
    while unique in taken and taken[unique] != path:
        unique, number = f"{number}-{name}", number + 1
    return unique


def _local_file(value: Any) -> Path | None:
    """``value`` as a path of this machine's file, or None (URLs, ``uploads/`` names)."""
    if not isinstance(value, str) or "://" in value or value.startswith("uploads/"):
        return None
    path = Path(value).expanduser()
    return path if path.is_file() else None


def local_inputs(spec_data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """``spec_data`` with the local files it reads renamed to multipart part names, and
    those files by part name; branch-list files are read into lists."""
    data, parts = dict(spec_data), {}

    def rename(value: Any) -> Any:
        path = _local_file(value)
        if path is None:
            return value
        name = _part_name(path.resolve(), parts)
        parts[name] = path.resolve()
        return name

    files = data.get("files")
    files = [files] if isinstance(files, str) else files
    if isinstance(files, list):
        data["files"] = [
            {**f, "path": rename(f.get("path"))} if isinstance(f, dict) else rename(f)
            for f in files
        ]
    for key in ("specs", "preproc"):
        if isinstance(data.get(key), str):
            data[key] = rename(data[key])
    for key in ("selected_branches", "exclude_branches", "identifier"):
        if isinstance(data.get(key), str):
            data[key] = split_names(data[key])
    return data, parts


def save_token(settings: Settings, token: str) -> Path:
    """Write ``token`` to ``<home>/token`` (owner-only), where :func:`resolve_token` reads it."""
    token = token.strip()
    if token.count(".") != 2:
        raise ClientError("not a JWT access token (expected three dot-separated parts)")
    path = Path(settings.home) / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(token + "\n")
    return path


def device_login(
    issuer: str,
    client_id: str,
    client_secret: str | None = None,
    scope: str = "openid mlaas4hep.submit",
    show: Callable[[dict], None] | None = None,
    timeout: float = 600.0,
    resource: str | None = None,
) -> str:
    """An access token by the OAuth2 device authorization grant (RFC 8628) at ``issuer``.

    ``show`` receives the device authorization answer (``verification_uri_complete``,
    ``user_code``) to tell the user where to approve; the token endpoint is then polled.
    ``resource`` is the RFC 8707 resource indicator some providers need to issue a JWT
    access token for this service.
    """
    credentials = {"client_id": client_id}
    if client_secret:
        credentials["client_secret"] = client_secret
    if resource:
        credentials["resource"] = resource
    with httpx.Client(timeout=30) as http:
        discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            discovery = http.get(discovery_url).json()
        except (httpx.HTTPError, ValueError) as error:
            raise ClientError(f"cannot read {discovery_url}: {error}") from None
        endpoint = discovery.get("device_authorization_endpoint")
        if not endpoint:
            raise ClientError(
                f"{issuer} does not offer the device authorization grant; get a token "
                "otherwise and pass it with --from-env or --from-file"
            )
        grant = http.post(endpoint, data={**credentials, "scope": scope})
        if grant.status_code != 200:
            raise ClientError(f"{endpoint} refused the device authorization: {grant.text[:200]}")
        answer = grant.json()
        if show is not None:
            show(answer)
        interval = float(answer.get("interval", 5))
        deadline = time.monotonic() + min(timeout, float(answer.get("expires_in", timeout)))
        body = {
            **credentials,
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": answer["device_code"],
        }
        while time.monotonic() < deadline:
            reply = http.post(discovery["token_endpoint"], data=body)
            data = reply.json() if reply.content else {}
            if reply.status_code == 200 and "access_token" in data:
                return data["access_token"]
            error = data.get("error")
            if error == "slow_down":
                interval += 5
            elif error != "authorization_pending":
                raise ClientError(f"device login failed: {error or reply.status_code}")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    raise ClientError(f"device login was not approved within {timeout:g} s")
