"""The platform's HTTP APIs in the test process, over storage in a temporary folder.

:class:`LocalApis` mounts the pipeline API (``/api/v1``) and the MLaaS4HEP server API
(``/mlaas4hep``) over one :class:`~mlaas4hep.serve.apps.pipeline_api.ApiContext`, as the
platform serves them, and calls them through ``httpx.ASGITransport`` with tokens of a
real issuer served on loopback (:mod:`auth_fixtures`). No Ray cluster is behind it: its
Jobs API address is a closed port, so a submission that passes every check is answered
503 once the platform tries to start its job, and the inference API has no model server
(a prediction or an upload that passes its checks is answered 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_fixtures import IssuerServer
from conftest import free_port
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from mlaas4hep.auth.issuer import LocalIssuer
from mlaas4hep.auth.oidc import owner_id
from mlaas4hep.store.storage import Storage

AUDIENCE = "mlaas4hep"


class LocalApis:
    """The pipeline and MLaaS4HEP server APIs of one context, called in process."""

    def __init__(self, settings: Any, issuer: LocalIssuer) -> None:
        from mlaas4hep.serve.apps.context import ApiContext
        from mlaas4hep.serve.apps.inference import create_app
        from mlaas4hep.serve.apps.mlaas4hep_server import create_mlaas4hep_server_api
        from mlaas4hep.serve.apps.pipeline_api import create_pipeline_api
        from mlaas4hep.serve.dataplane import DataPlane, TFaaSOptions

        self.settings = settings
        self.issuer = issuer
        self.ctx = ApiContext.from_settings(settings)
        self.apps = {
            "/api/v1": create_pipeline_api(self.ctx),
            "/mlaas4hep": create_mlaas4hep_server_api(self.ctx),
            "/tfaas": create_app(DataPlane(settings, TFaaSOptions(), None, self.ctx.validator)),
        }
        self._tokens: dict[str, str] = {}

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The apps by path prefix, as the platform's proxy routes (any byte of the path
        goes through, and the app is told its prefix as ``root_path``)."""
        path = scope.get("path", "")
        for prefix, app in self.apps.items():
            if path == prefix or path.startswith(prefix + "/"):
                await app(
                    {**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send
                )
                return
        await JSONResponse({"error": f"no app at {path!r}"}, status_code=404)(scope, receive, send)

    @property
    def storage(self) -> Storage:
        return self.ctx.storage

    def owner(self, sub: str) -> str:
        return owner_id(sub, self.issuer.issuer_url)

    def headers(self, sub: str) -> dict[str, str]:
        if sub not in self._tokens:
            self._tokens[sub] = self.issuer.mint(sub, groups=["/cms"])
        return {"Authorization": f"Bearer {self._tokens[sub]}"}

    def call(self, sub: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request as ``sub``; errors come back as the answers the apps give."""
        headers = {**self.headers(sub), **kwargs.pop("headers", {})}
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)

        async def request() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://platform") as c:
                return await c.request(method, path, headers=headers, timeout=60, **kwargs)

        return asyncio.run(request())

    def stored_files(self, *parts: str) -> list[str]:
        """Every file below ``parts`` of the storage, relative to the storage root."""
        base = Path(self.storage.path(*parts))
        root = Path(self.storage.root)
        return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def local_apis(
    platform_settings: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalApis]:
    """:class:`LocalApis` of the module, with its own issuer and storage."""
    server = IssuerServer(tmp_path_factory.mktemp("issuers")).start()
    try:
        issuer = server.add_issuer("tests", AUDIENCE)
        settings = platform_settings.model_copy(
            update={
                "oidc_issuer": [issuer.issuer_url],
                "oidc_audience": AUDIENCE,
                "storage": str(tmp_path_factory.mktemp("storage")),
                "dashboard_port": free_port(),  # nothing listens: no cluster
                "dashboard_url": None,
            }
        )
        yield LocalApis(settings, issuer)
    finally:
        server.stop()
