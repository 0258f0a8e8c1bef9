"""Bearer-token validation and authorization with real JWTs and real HTTP key discovery."""

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Annotated

import httpx
import pytest
from auth_fixtures import (
    IssuerServer,
    b64url,
    forge,
    make_validator,
    refusal,
    token_parts,
    validate,
)
from conftest import free_port
from fastapi import Depends, FastAPI
from joserfc import jwt
from joserfc.jwk import RSAKey

from mlaas4hep.auth.issuer import LocalIssuer
from mlaas4hep.auth.oidc import AuthConfig, AuthError, Principal, TokenValidator, owner_id
from mlaas4hep.serve.errors import install_error_handlers
from mlaas4hep.serve.security import principal_dependency


@pytest.fixture(scope="module")
def cms(issuer_server: IssuerServer) -> LocalIssuer:
    return issuer_server.add_issuer("cms")


@pytest.fixture(scope="module")
def atlas(issuer_server: IssuerServer) -> LocalIssuer:
    return issuer_server.add_issuer("atlas")


@pytest.fixture(scope="module")
def validator(cms: LocalIssuer) -> TokenValidator:
    """One validator for the module, so keys are fetched once."""
    return make_validator(cms)


# -- good tokens ------------------------------------------------------------------


def test_valid_token_gives_principal_with_groups_and_scopes(cms, validator):
    token = cms.mint("alice", groups=["/cms", "/cms/production"], name="Alice Physicist")
    principal = validate(validator, token)
    assert principal.sub == "alice"
    assert principal.issuer == cms.issuer_url
    assert principal.groups == ("/cms", "/cms/production")
    assert principal.scopes == ("mlaas4hep.use", "mlaas4hep.submit")
    assert principal.name == "Alice Physicist"
    assert not principal.is_admin


def test_token_within_clock_leeway_is_accepted(cms, validator):
    now = int(time.time())
    token = cms.mint("alice", exp=now - 5, nbf=now + 5, iat=now + 5)
    assert validate(validator, token).sub == "alice"


def test_keycloak_roles_and_scp_claims_give_groups_and_scopes(cms, validator):
    token = cms.mint(
        "bob",
        groups=[],
        scope="",
        scp=["mlaas4hep.submit"],
        realm_access={"roles": ["physicist"]},
        resource_access={"mlaas4hep": {"roles": ["trainer"]}, "other": {"roles": ["x"]}},
    )
    principal = validate(validator, token)
    assert principal.groups == ("physicist", "trainer")
    assert principal.scopes == ("mlaas4hep.submit",)


def test_audience_list_containing_ours_is_accepted(cms, validator):
    token = cms.mint("alice", aud=["other-service", "mlaas4hep"])
    assert validate(validator, token).sub == "alice"


def test_admin_group_makes_principal_admin(cms, validator):
    principal = validate(validator, cms.mint("root", groups=["/mlaas4hep/admins"]))
    assert principal.is_admin
    validator.authorize(principal, "admin")


# -- the bad-token matrix ---------------------------------------------------------


def _hs256_with_public_key(cms: LocalIssuer) -> str:
    """The classic confusion attack: HMAC keyed with the issuer's public RSA key."""
    public = RSAKey.import_key(cms.jwks()["keys"][-1])
    secret = public.as_pem(private=False)
    header = {"alg": "HS256", "kid": cms.current_kid, "typ": "JWT"}
    _, claims, _ = token_parts(cms.mint("mallory"))
    signing_input = f"{b64url(header)}.{b64url(claims)}".encode()
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{b64url(signature)}"


def _alg_none(cms: LocalIssuer) -> str:
    _, claims, _ = token_parts(cms.mint("mallory"))
    return forge({"alg": "none", "typ": "JWT"}, claims)


def _tampered(cms: LocalIssuer) -> str:
    header, claims, signature = token_parts(cms.mint("mallory", groups=["/cms"]))
    claims["groups"] = claims["wlcg.groups"] = ["/mlaas4hep/admins"]
    return f"{b64url(header)}.{b64url(claims)}.{signature}"


def _signed_by_other_key_with_known_kid(cms: LocalIssuer) -> str:
    other = RSAKey.generate_key(2048)
    _, claims, _ = token_parts(cms.mint("mallory"))
    return jwt.encode({"alg": "RS256", "kid": cms.current_kid}, claims, other)


BAD_TOKENS: dict[str, tuple[Callable[[LocalIssuer], str | None], str]] = {
    "missing": (lambda cms: None, "missing bearer token"),
    "empty": (lambda cms: "  ", "missing bearer token"),
    "not_a_jwt": (lambda cms: "not-a-token", "malformed bearer token: a JWT has three"),
    "bad_base64": (lambda cms: "%%%.@@@.###", "malformed bearer token: its header is not"),
    "payload_not_object": (
        lambda cms: f"{b64url({'alg': 'RS256'})}.{b64url(b'[1, 2]')}.c2ln",
        "malformed bearer token: its payload is not a JSON object",
    ),
    "jwe": (lambda cms: "a.b.c.d.e", "encrypted tokens (JWE) are not supported"),
    "expired": (lambda cms: cms.mint("alice", ttl=-600), "token expired 60"),  # 600 or 601 s ago
    "not_yet_valid": (
        lambda cms: cms.mint("alice", nbf=int(time.time()) + 600),
        "token not valid yet",
    ),
    "issued_in_future": (
        lambda cms: cms.mint("alice", iat=int(time.time()) + 600),
        "token issued in the future",
    ),
    "wrong_issuer": (
        lambda cms: LocalIssuer(cms.key_dir, "https://evil.example.org/issuer").mint("alice"),
        "untrusted token issuer 'https://evil.example.org/issuer'",
    ),
    "wrong_audience": (
        lambda cms: cms.mint("alice", aud="another-service"),
        "token audience 'another-service' does not include 'mlaas4hep'",
    ),
    "alg_none": (_alg_none, "unsigned token (alg 'none') refused"),
    "hs256_signed_with_public_key": (
        _hs256_with_public_key,
        "token algorithm 'HS256' refused: HMAC-signed tokens are not accepted",
    ),
    "tampered_payload": (_tampered, "invalid token signature"),
    "other_key_with_known_kid": (_signed_by_other_key_with_known_kid, "invalid token signature"),
    "no_expiry": (lambda cms: cms.mint("alice", exp=None), "token has no valid expiry time"),
    "no_audience": (lambda cms: cms.mint("alice", aud=None), "token has no audience (aud)"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_token_is_refused_with_401_and_clear_message(case, cms, validator):
    make, message = BAD_TOKENS[case]
    token = make(cms)
    error = refusal(validator, token)
    assert error.status_code == 401
    assert message in error.message
    for part in (token or "").split("."):
        if len(part) > 8:
            assert part not in error.message  # tokens never leak into messages


def test_unknown_kid_refreshes_keys_at_most_once_per_interval(issuer_server, tmp_path):
    real = issuer_server.add_issuer("ratelimit")
    # Same issuer URL, another key folder: a forger who knows the issuer's name.
    forger = LocalIssuer(tmp_path / "forger", real.issuer_url)
    validator = make_validator(real)
    validate(validator, real.mint("alice"))
    assert issuer_server.jwks_fetches("ratelimit") == 1

    error = refusal(validator, forger.mint("mallory"))
    assert error.status_code == 401
    assert f"token signed with key id '{forger.current_kid}' unknown to issuer" in error.message
    assert issuer_server.jwks_fetches("ratelimit") == 1  # fetched < 10 s ago: no refresh

    for _ in range(5):
        forger.rotate()
        assert refusal(validator, forger.mint("mallory")).status_code == 401
    assert issuer_server.jwks_fetches("ratelimit") == 1

    eager = make_validator(real, jwks_refresh_interval=0.0)
    validate(eager, real.mint("alice"))
    refusal(eager, forger.mint("mallory"))
    assert issuer_server.jwks_fetches("ratelimit") == 3  # first fetch + one refresh


def test_rotated_key_validates_after_refresh_and_old_kid_still_validates(issuer_server):
    issuer = issuer_server.add_issuer("rotation")
    validator = make_validator(issuer, jwks_refresh_interval=0.5)
    old_token = issuer.mint("alice")
    old_kid = issuer.current_kid
    assert validate(validator, old_token).sub == "alice"

    new_kid = issuer.rotate()
    assert new_kid != old_kid
    new_token = issuer.mint("alice")
    assert token_parts(new_token)[0]["kid"] == new_kid
    time.sleep(0.6)
    assert validate(validator, new_token).sub == "alice"
    assert issuer_server.jwks_fetches("rotation") == 2
    assert validate(validator, old_token).sub == "alice"

    # Beyond ``keep`` (3) keys the oldest leaves the JWKS, and its tokens stop working.
    issuer.rotate()
    issuer.rotate()
    time.sleep(0.6)
    validate(validator, issuer.mint("alice"))
    error = refusal(validator, old_token)
    assert f"key id '{old_kid}' unknown" in error.message


def test_a_verified_token_skips_the_signature_check_until_it_expires(cms, monkeypatch):
    validator = make_validator(cms)
    token = cms.mint("alice", ttl=5)
    checks = []
    check = validator._signature_ok
    monkeypatch.setattr(validator, "_signature_ok", lambda *a: checks.append(1) or check(*a))
    assert [validate(validator, token).sub for _ in range(3)] == ["alice"] * 3
    assert len(checks) == 1
    later = time.time() + 5 + validator.config.leeway + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert "token expired" in refusal(validator, token).message


def test_a_verified_token_is_checked_again_after_the_keys_are_refetched(issuer_server):
    issuer = issuer_server.add_issuer("refetch")
    validator = make_validator(issuer, jwks_refresh_interval=0.0)
    token = issuer.mint("alice")
    validate(validator, token)
    for _ in range(3):  # the old key leaves the JWK Set (keep=3)
        issuer.rotate()
    validate(validator, issuer.mint("bob"))  # unknown kid: the keys are refetched
    assert f"key id '{token_parts(token)[0]['kid']}' unknown" in refusal(validator, token).message


def test_several_trusted_issuers_are_accepted_and_kept_apart(issuer_server, cms, atlas):
    stranger = issuer_server.add_issuer("stranger")
    validator = make_validator(cms, atlas)
    from_cms = validate(validator, cms.mint("alice", groups=["/cms"]))
    from_atlas = validate(validator, atlas.mint("alice", groups=["/atlas"]))
    assert (from_cms.issuer, from_atlas.issuer) == (cms.issuer_url, atlas.issuer_url)
    assert from_cms.groups == ("/cms",) and from_atlas.groups == ("/atlas",)
    assert from_cms.owner != from_atlas.owner  # same sub, different people

    error = refusal(validator, stranger.mint("alice"))
    assert error.message == f"untrusted token issuer '{stranger.issuer_url}'"


def test_unreachable_issuer_answers_503_naming_the_issuer(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/issuer"
    issuer = LocalIssuer(tmp_path / "keys", url)
    validator = make_validator(issuer, http_timeout=2.0)
    error = refusal(validator, issuer.mint("alice"))
    assert error.status_code == 503
    assert error.message.startswith(f"cannot fetch the signing keys of issuer {url}: ")
    assert "/.well-known/openid-configuration" in error.message


def test_issuer_whose_discovery_names_another_issuer_is_not_trusted(issuer_server, cms):
    # The cms endpoints also answer at /alias: discovery there still says ".../cms".
    issuer_server.mount("alias", cms)
    alias = LocalIssuer(cms.key_dir, issuer_server.url("alias"))
    validator = make_validator(alias)
    error = refusal(validator, alias.mint("alice"))
    assert error.status_code == 503
    assert error.message.endswith(
        f"{alias.issuer_url}/.well-known/openid-configuration names issuer '{cms.issuer_url}'"
    )


def test_keys_are_fetched_once_for_concurrent_requests(issuer_server):
    issuer = issuer_server.add_issuer("concurrent")
    validator = make_validator(issuer)
    tokens = [issuer.mint(f"user{i}") for i in range(8)]

    async def all_at_once() -> list[Principal]:
        return await asyncio.gather(*(validator.validate(t) for t in tokens))

    principals = asyncio.run(all_at_once())
    assert [p.sub for p in principals] == [f"user{i}" for i in range(8)]
    assert issuer_server.jwks_fetches("concurrent") == 1


# -- authorization ----------------------------------------------------------------


def forbidden(validator: TokenValidator, principal: Principal, action: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        validator.authorize(principal, action)
    return info.value


def test_authorize_checks_groups_scopes_and_admin(cms):
    validator = make_validator(cms, allowed_groups=["/cms"])
    member = validate(validator, cms.mint("alice", groups=["/cms/production"]))
    validator.authorize(member, "use")
    validator.authorize(member, "submit")

    outsider = validate(validator, cms.mint("eve", groups=["/atlas"]))
    error = forbidden(validator, outsider, "use")
    assert (error.status_code, error.message) == (
        403,
        "eve is not in a group allowed to use this service (/cms)",
    )

    read_only = validate(validator, cms.mint("carol", groups=["/cms"], scope="mlaas4hep.use"))
    validator.authorize(read_only, "use")
    error = forbidden(validator, read_only, "submit")
    assert error.status_code == 403
    assert error.error == "insufficient_scope"
    assert error.message == (
        "token lacks the scope to submit pipelines: needs mlaas4hep.submit or compute.create"
    )

    error = forbidden(validator, member, "admin")
    assert (error.status_code, error.message) == (
        403,
        "alice is not an administrator (needs group /mlaas4hep/admins)",
    )

    admin = validate(validator, cms.mint("root", groups=["/mlaas4hep/admins"]))
    for action in ("use", "submit", "admin"):
        validator.authorize(admin, action)  # admins need not be in allowed_groups


def test_config_refuses_none_and_hmac_algorithms():
    for alg in ("none", "HS256"):
        with pytest.raises(ValueError, match=f"{alg} not allowed"):
            AuthConfig(issuers=["https://iam.example.org/"], algorithms=("RS256", alg))
    with pytest.raises(ValueError, match="at least one trusted issuer"):
        AuthConfig(issuers=[])


def test_owner_is_stable_path_safe_and_distinct_per_issuer():
    owner = owner_id("alice@cern.ch", "https://auth.cern.ch/auth/realms/cern")
    assert owner == owner_id("alice@cern.ch", "https://auth.cern.ch/auth/realms/cern")
    assert re.fullmatch(r"alice_cern.ch-[0-9a-f]{10}", owner)
    assert owner != owner_id("alice@cern.ch", "https://iam.example.org/")
    sneaky = owner_id("../../etc/passwd", "https://iam.example.org/")
    assert "/" not in sneaky and not sneaky.startswith(".")
    assert owner_id("a@b", "x") != owner_id("a_b", "x")


# -- FastAPI dependency -----------------------------------------------------------


def _tiny_app(validator: TokenValidator) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    user = Annotated[Principal, Depends(principal_dependency(validator))]
    submitter = Annotated[Principal, Depends(principal_dependency(validator, "submit"))]

    @app.get("/me")
    async def me(principal: user) -> dict:
        return {"owner": principal.owner, "groups": list(principal.groups)}

    @app.post("/submit")
    async def submit(principal: submitter) -> dict:
        return {"submitted_by": principal.sub}

    return app


def test_fastapi_dependency_answers_401_403_and_200(cms):
    validator = make_validator(cms)
    app = _tiny_app(validator)
    good = cms.mint("alice", groups=["/cms"])
    read_only = cms.mint("carol", scope="mlaas4hep.use")

    async def calls() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return {
                "missing": await client.get("/me"),
                "basic": await client.get("/me", headers={"Authorization": "Basic YTpi"}),
                "bad": await client.get("/me", headers={"Authorization": "Bearer abc.def.ghi"}),
                "good": await client.get("/me", headers={"Authorization": f"Bearer {good}"}),
                "scope": await client.post(
                    "/submit", headers={"Authorization": f"Bearer {read_only}"}
                ),
                "submit": await client.post("/submit", headers={"Authorization": f"bearer {good}"}),
            }

    r = asyncio.run(calls())
    assert r["missing"].status_code == 401
    assert r["missing"].json() == {"error": "missing bearer token"}
    assert r["missing"].headers["www-authenticate"] == 'Bearer realm="mlaas4hep"'

    assert r["basic"].status_code == 401
    assert r["basic"].json() == {"error": "the Authorization header must use the Bearer scheme"}

    assert r["bad"].status_code == 401
    assert r["bad"].json()["error"].startswith("malformed bearer token")
    assert 'error="invalid_token"' in r["bad"].headers["www-authenticate"]

    assert r["good"].status_code == 200
    assert r["good"].json() == {
        "owner": owner_id("alice", cms.issuer_url),
        "groups": ["/cms"],
    }

    assert r["scope"].status_code == 403
    assert r["scope"].json()["error"].startswith("token lacks the scope to submit pipelines")
    assert 'error="insufficient_scope"' in r["scope"].headers["www-authenticate"]

    assert r["submit"].status_code == 200
    assert r["submit"].json() == {"submitted_by": "alice"}


def test_principal_dependency_refuses_unknown_action(cms):
    with pytest.raises(ValueError, match="unknown action 'delete'"):
        principal_dependency(make_validator(cms), "delete")
