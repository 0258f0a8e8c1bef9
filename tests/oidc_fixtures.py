"""A real OpenID Connect provider (panva's ``oidc-provider`` from npm) and ASGI apps on loopback.

:class:`OIDCProvider` runs ``tests/oidc/server.mjs`` with node: discovery, JWKS, the
client_credentials and device authorization grants, JWT access tokens (RFC 9068) with a
``groups`` claim per client. :meth:`OIDCProvider.rotate` restarts it on the same port
with a new signing key (new ``kid``) first and the old one kept, as providers rotate.
The npm package is installed by ``make setup`` (``npm ci`` in ``tests/oidc``).

:func:`serve_apis` serves the platform's API apps on loopback.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_fixtures import IssuerServer
from conftest import free_port
from joserfc.jwk import RSAKey

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
AUDIENCE = "mlaas4hep"
SCOPE = "mlaas4hep.submit"


def _signing_key(kid: str) -> dict[str, Any]:
    key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
    return key.as_dict(private=True)


class OIDCProvider:
    """oidc-provider on ``http://127.0.0.1:<port>`` with confidential clients."""

    def __init__(self, workdir: Path, clients: dict[str, list[str]]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.secrets = {name: secrets.token_urlsafe(24) for name in clients}
        self.clients = clients
        self.keys = [_signing_key("key-1")]
        self.process: subprocess.Popen | None = None

    @property
    def kid(self) -> str:
        """The key id new tokens are signed with."""
        return self.keys[0]["kid"]

    def _write_config(self) -> Path:
        config = {
            "port": self.port,
            "audience": AUDIENCE,
            "resource": "urn:mlaas4hep",
            "scope": SCOPE,
            "jwks": {"keys": self.keys},
            "clients": [
                {"client_id": c, "client_secret": self.secrets[c], "groups": g}
                for c, g in self.clients.items()
            ],
        }
        path = self.workdir / "provider.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def start(self) -> OIDCProvider:
        node = shutil.which("node")
        if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            pytest.fail(
                "the OIDC provider of the tests is not installed: run 'make setup' "
                f"(npm ci in {OIDC_DIR}) with node >= 20 on PATH"
            )
        self.process = subprocess.Popen(
            [node, str(OIDC_DIR / "server.mjs"), str(self._write_config())],
            cwd=OIDC_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"oidc-provider exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.issuer + "/jwks", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"oidc-provider did not answer at {self.issuer}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def rotate(self) -> str:
        """Sign with a new key from now on (the old one stays published); return its kid."""
        self.keys = [_signing_key(f"key-{len(self.keys) + 1}"), *self.keys]
        self.stop()
        self.start()
        return self.kid

    def discovery(self) -> dict[str, Any]:
        return httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=10).json()

    def token(self, client: str, scope: str = SCOPE) -> str:
        """An access token for ``client`` by the client_credentials grant."""
        response = httpx.post(
            self.discovery()["token_endpoint"],
            data={
                "grant_type": "client_credentials",
                "client_id": client,
                "client_secret": self.secrets[client],
                "scope": scope,
            },
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def approve_device(self, url: str, login: str) -> None:
        """Do the user's part of a device login at ``url`` (verification_uri_complete):
        confirm the code, sign in as ``login`` on the provider's pages, consent."""
        with httpx.Client(follow_redirects=True, timeout=30) as browser:
            page = browser.get(url)
            for _ in range(8):
                if "Sign-in Success" in page.text:
                    return
                action, fields = _first_form(page.text)
                fields.pop("abort", None)
                if "login" in fields:
                    fields.update(login=login, password="any")
                page = browser.post(page.url.join(action or str(page.url)), data=fields)
        raise RuntimeError(f"device approval did not finish: {page.text[-300:]}")


def _first_form(text: str) -> tuple[str | None, dict[str, str]]:
    """Action and fields (hidden values; empty text inputs) of the page's first form."""
    form = re.search(r"<form([^>]*)>(.*?)</form>", text, re.S)
    if form is None:
        raise RuntimeError(f"no form on the provider's page: {text[-300:]}")
    action = re.search(r'action="([^"]*)"', form[1])
    fields = {}
    for tag in re.findall(r"<input[^>]*>", form[2]):
        name = re.search(r'name="([^"]+)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name:
            fields[name[1]] = html.unescape(value[1]) if value else ""
    return (html.unescape(action[1]) if action else None), fields


@pytest.fixture(scope="module")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OIDCProvider]:
    """oidc-provider with clients alice (/cms), bob (/atlas) and carol (/mlaas4hep/admins)."""
    workdir = tmp_path_factory.mktemp("oidc-provider")
    provider = OIDCProvider(
        workdir, {"alice": ["/cms"], "bob": ["/atlas"], "carol": ["/mlaas4hep/admins"]}
    )
    provider.start()
    yield provider
    provider.stop()


def api_settings(platform_settings, issuer: str, **changes: Any):
    """The session's settings trusting ``issuer`` instead of the built-in one."""
    return platform_settings.model_copy(
        update={"oidc_issuer": [issuer], "oidc_audience": AUDIENCE, **changes}
    )


def serve_apis(settings, workdir: Path) -> IssuerServer:
    """The pipeline API at /api/v1 and the MLaaS4HEP server API at /mlaas4hep, over one
    context, served on loopback (``.base_url``)."""
    from mlaas4hep.serve.apps.context import ApiContext
    from mlaas4hep.serve.apps.mlaas4hep_server import create_mlaas4hep_server_api
    from mlaas4hep.serve.apps.pipeline_api import create_pipeline_api

    ctx = ApiContext.from_settings(settings)
    server = IssuerServer(workdir)
    server.mount_app("/api/v1", create_pipeline_api(ctx))
    server.mount_app("/mlaas4hep", create_mlaas4hep_server_api(ctx))
    return server.start()


__all__ = ["oidc_provider"]
