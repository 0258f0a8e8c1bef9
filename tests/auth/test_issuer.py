"""The built-in token issuer: key storage, minted tokens, and its Serve app over HTTP."""

import asyncio
import json
import stat
import time

import httpx
import pytest
from auth_fixtures import token_parts

from mlaas4hep.auth.issuer import KEY_FILE, IssuerError, LocalIssuer, builtin_issuer
from mlaas4hep.auth.oidc import TokenValidator
from mlaas4hep.settings import Settings

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ISSUER_URL = "http://127.0.0.1:8000/issuer"


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_private_key_file_readable_only_by_owner(tmp_path):
    key_dir = tmp_path / "issuer"
    issuer = LocalIssuer(key_dir, ISSUER_URL)
    assert _mode(key_dir) == 0o700
    assert _mode(key_dir / KEY_FILE) == 0o600
    stored = json.loads((key_dir / KEY_FILE).read_text())
    assert stored["current"] == issuer.current_kid
    assert {"d", "p", "q"} <= set(stored["keys"][0])


def test_key_is_reused_by_every_issuer_on_the_same_folder(tmp_path):
    first = LocalIssuer(tmp_path, ISSUER_URL)
    second = LocalIssuer(tmp_path, ISSUER_URL)
    assert first.current_kid == second.current_kid
    assert first.jwks() == second.jwks()


def test_jwks_holds_public_keys_only(tmp_path):
    issuer = LocalIssuer(tmp_path, ISSUER_URL)
    issuer.rotate()
    keys = issuer.jwks()["keys"]
    assert len(keys) == 2
    for key in keys:
        assert key["kty"] == "RSA" and key["use"] == "sig" and key["alg"] == "RS256"
        assert not PRIVATE_MEMBERS & set(key)


def test_minted_token_carries_standard_and_wlcg_claims(tmp_path):
    issuer = LocalIssuer(tmp_path, ISSUER_URL + "/", audience="analysis")
    before = int(time.time())
    header, claims, _ = token_parts(issuer.mint("alice", groups=["/cms"], ttl=600, name="Alice"))
    assert header == {"alg": "RS256", "kid": issuer.current_kid, "typ": "JWT"}
    assert claims["iss"] == ISSUER_URL  # trailing slash dropped
    assert claims["aud"] == "analysis"
    assert claims["sub"] == "alice" and claims["name"] == "Alice"
    assert before <= claims["iat"] == claims["nbf"] <= claims["exp"] - 600
    assert claims["wlcg.groups"] == claims["groups"] == ["/cms"]
    assert claims["scope"] == "mlaas4hep.use mlaas4hep.submit"
    assert len(claims["jti"]) == 32
    assert claims["jti"] != token_parts(issuer.mint("alice"))[1]["jti"]


def test_mint_refuses_empty_subject(tmp_path):
    with pytest.raises(ValueError, match="a token needs a subject"):
        LocalIssuer(tmp_path, ISSUER_URL).mint("")


def test_negative_lifetime_mints_an_expired_token(tmp_path):
    _, claims, _ = token_parts(LocalIssuer(tmp_path, ISSUER_URL).mint("alice", ttl=-60))
    assert claims["exp"] == claims["iat"] - 60


def test_rotation_keeps_previous_keys_and_shows_in_other_processes(tmp_path):
    cli = LocalIssuer(tmp_path, ISSUER_URL)
    server = LocalIssuer(tmp_path, ISSUER_URL)
    kids = [cli.current_kid]
    for _ in range(3):
        kids.append(cli.rotate())
    assert len(set(kids)) == 4
    # The other instance rereads the changed file: new current key, three kept.
    assert server.current_kid == kids[-1]
    assert [k["kid"] for k in server.jwks()["keys"]] == kids[-3:]
    assert token_parts(server.mint("alice"))[0]["kid"] == kids[-1]


def test_key_file_readable_by_others_is_restricted(tmp_path):
    LocalIssuer(tmp_path, ISSUER_URL)
    (tmp_path / KEY_FILE).chmod(0o644)
    LocalIssuer(tmp_path, ISSUER_URL).jwks()
    assert _mode(tmp_path / KEY_FILE) == 0o600


def test_corrupt_key_file_is_reported_with_its_path(tmp_path):
    (tmp_path / KEY_FILE).write_text("{not json")
    (tmp_path / KEY_FILE).chmod(0o600)
    with pytest.raises(IssuerError, match=f"{tmp_path / KEY_FILE}: not a readable signing key"):
        LocalIssuer(tmp_path, ISSUER_URL)


def test_discovery_document_names_issuer_and_jwks_uri(tmp_path):
    doc = LocalIssuer(tmp_path, ISSUER_URL).openid_configuration()
    assert doc["issuer"] == ISSUER_URL
    assert doc["jwks_uri"] == ISSUER_URL + "/jwks"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]


def test_builtin_issuer_uses_settings_home_and_api_url(tmp_path):
    settings = Settings(home=str(tmp_path), port=8123, oidc_audience="aud")
    issuer = builtin_issuer(settings)
    assert issuer.issuer_url == "http://127.0.0.1:8123/issuer"
    assert issuer.key_dir == tmp_path / "issuer"
    assert issuer.audience == "aud"


@pytest.mark.ray
def test_issuer_serve_app_serves_discovery_and_public_jwks_that_validate_tokens(
    serve_url, tmp_path
):
    from ray import serve

    from mlaas4hep.serve.apps.issuer_app import build_issuer_app

    # A path prefix of its own, so the platform's own /issuer app is not disturbed.
    settings = Settings(home=str(tmp_path), public_url=f"{serve_url}/authtest")
    issuer_url = settings.builtin_issuer_url
    serve.run(build_issuer_app(settings), name="authtest-issuer", route_prefix="/authtest/issuer")
    try:
        discovery = httpx.get(f"{issuer_url}/.well-known/openid-configuration", timeout=10)
        assert discovery.status_code == 200
        assert discovery.json()["issuer"] == issuer_url
        jwks = httpx.get(discovery.json()["jwks_uri"], timeout=10)
        assert jwks.status_code == 200
        assert jwks.headers["content-type"] == "application/jwk-set+json"

        # The replica created the key in the folder of ``settings``; the CLI signs with it.
        local = builtin_issuer(settings)
        assert [k["kid"] for k in jwks.json()["keys"]] == [local.current_kid]
        private = json.loads((settings.issuer_key_dir / KEY_FILE).read_text())["keys"][0]
        for key in jwks.json()["keys"]:
            assert not PRIVATE_MEMBERS & set(key)
        assert private["d"] not in jwks.text and private["p"] not in jwks.text

        principal = asyncio.run(
            TokenValidator.from_settings(settings).validate(local.mint("alice", groups=["/cms"]))
        )
        assert (principal.sub, principal.issuer, principal.groups) == (
            "alice",
            issuer_url,
            ("/cms",),
        )

        # A rotation by the CLI shows in the served JWKS at once.
        new_kid = local.rotate()
        kids = [k["kid"] for k in httpx.get(f"{issuer_url}/jwks", timeout=10).json()["keys"]]
        assert kids[-1] == new_kid and len(kids) == 2
        principal = asyncio.run(TokenValidator.from_settings(settings).validate(local.mint("bob")))
        assert principal.sub == "bob"
    finally:
        serve.delete("authtest-issuer")
