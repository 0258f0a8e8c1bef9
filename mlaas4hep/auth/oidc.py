"""Bearer-token authentication and authorization.

A request carries ``Authorization: Bearer <JWT>`` issued by a standard OIDC provider
(INDIGO IAM, CERN SSO, Keycloak) or by the platform's built-in issuer
(:mod:`mlaas4hep.auth.issuer`); both take the same path here:

1. the token's header must name an allowed asymmetric algorithm (never ``none``,
   never HMAC) and its ``iss`` must be one of the configured issuers;
2. the issuer's keys come from OIDC discovery (``<iss>/.well-known/openid-configuration``
   → ``jwks_uri``) and are cached per issuer; a token with an unknown ``kid`` refreshes
   them, at most once per ``jwks_refresh_interval`` seconds per issuer, so key rotation
   works and forged kids cannot make the service hammer the issuer;
3. the signature is verified with the key named by ``kid`` whose type matches the
   algorithm, then ``aud``, ``exp``, ``nbf`` and ``iat`` (with ``leeway``) and ``sub``;
4. a token that passed is remembered (by its SHA-256) for ``verified_token_ttl`` seconds
   at most, never past its expiry and only while its issuer's keys are not refetched,
   so a client's repeated calls cost one signature check a minute instead of one per call.

Authorization uses the groups (WLCG ``wlcg.groups``, ``groups``, Keycloak and CERN
roles) and scopes (``scope`` or ``scp``) of the resulting :class:`Principal`.
Tokens never appear in logs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, RSAKey

if TYPE_CHECKING:
    from mlaas4hep.settings import Settings

logger = logging.getLogger(__name__)

Action = Literal["use", "submit", "admin"]
ACTIONS: tuple[str, ...] = ("use", "submit", "admin")

#: Key type (and EC curve) each accepted signature algorithm needs.
ALGORITHM_KEYS: dict[str, tuple[str, str | None]] = {
    **{f"RS{n}": ("RSA", None) for n in (256, 384, 512)},
    **{f"PS{n}": ("RSA", None) for n in (256, 384, 512)},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
DEFAULT_ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_KEYS)

#: Claims holding groups or roles; a dotted path looks into nested objects, but a
#: key that contains dots itself (``wlcg.groups``) is matched first.
DEFAULT_GROUP_CLAIMS: tuple[str, ...] = (
    "wlcg.groups",
    "groups",
    "roles",
    "realm_access.roles",
    "resource_access.{audience}.roles",
    "cern_roles",
)

#: Scopes an action needs (any one of them); an empty list needs none.
DEFAULT_REQUIRED_SCOPES: dict[str, list[str]] = {
    "use": [],
    "submit": ["mlaas4hep.submit", "compute.create"],
    "admin": [],
}

_ACTION_VERBS = {"use": "use the service", "submit": "submit pipelines", "admin": "administer"}
_DISCOVERY_PATH = "/.well-known/openid-configuration"


class AuthError(Exception):
    """A request refused for its credentials.

    ``status_code`` is 401 (no or invalid token), 403 (valid token, not allowed) or 503
    (the issuer's keys cannot be fetched). ``error`` is the RFC 6750 error code for the
    ``WWW-Authenticate`` header, and ``scope`` the scopes that would have been enough.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        error: str | None = None,
        scope: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error = error
        self.scope = scope


def _invalid(message: str) -> AuthError:
    return AuthError(401, message, error="invalid_token")


def _forbidden(message: str) -> AuthError:
    return AuthError(403, message)


def _show(value: Any, limit: int = 80) -> str:
    """A token-supplied value, quoted and shortened for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _group_path(group: str) -> str:
    return group.strip().strip("/")


def groups_match(groups: Iterable[str], wanted: Iterable[str]) -> bool:
    """Whether one of ``groups`` is one of ``wanted`` or a subgroup of one.

    Leading slashes do not matter (Keycloak may omit them), and WLCG subgroups
    belong to their parents: ``/cms/production`` is in ``/cms``.
    """
    have = [_group_path(g) for g in groups]
    for want in map(_group_path, wanted):
        if any(g == want or g.startswith(want + "/") for g in have):
            return True
    return False


def owner_id(sub: str, issuer: str) -> str:
    """A stable, path- and URL-safe id for the user ``sub`` of ``issuer``.

    The readable part comes from ``sub``; the hash of issuer and subject keeps users of
    different issuers (and subjects that sanitize alike) apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", sub).strip("._-")[:40] or "user"
    digest = hashlib.sha256(f"{issuer}\n{sub}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    sub: str
    issuer: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    name: str | None = None
    is_admin: bool = False

    @property
    def owner(self) -> str:
        """Id used in storage paths (``uploads/<owner>/``) and Ray job metadata."""
        return owner_id(self.sub, self.issuer)

    def in_groups(self, wanted: Iterable[str]) -> bool:
        """Whether the caller belongs to one of ``wanted`` (or a subgroup of one)."""
        return groups_match(self.groups, wanted)

    def __repr__(self) -> str:
        return f"Principal(sub={self.sub!r}, issuer={self.issuer!r}, owner={self.owner!r})"


@dataclass
class AuthConfig:
    """Who is trusted and what they may do."""

    issuers: list[str]
    audience: str = "mlaas4hep"
    allowed_groups: list[str] = field(default_factory=list)
    admin_groups: list[str] = field(default_factory=lambda: ["/mlaas4hep/admins"])
    required_scopes: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_REQUIRED_SCOPES.items()}
    )
    group_claims: tuple[str, ...] = DEFAULT_GROUP_CLAIMS
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: int = 30
    jwks_refresh_interval: float = 10.0
    jwks_max_age: float = 3600.0
    http_timeout: float = 5.0
    max_token_bytes: int = 16384
    verified_token_ttl: float = 60.0
    max_verified_tokens: int = 4096

    def __post_init__(self) -> None:
        if not self.issuers:
            raise ValueError("AuthConfig.issuers: at least one trusted issuer is needed")
        refused = [a for a in self.algorithms if a not in ALGORITHM_KEYS]
        if refused:
            raise ValueError(
                f"AuthConfig.algorithms: {', '.join(refused)} not allowed; "
                f"choose among {', '.join(ALGORITHM_KEYS)} (never 'none' or HMAC)"
            )
        unknown = set(self.required_scopes) - set(ACTIONS)
        if unknown:
            raise ValueError(f"AuthConfig.required_scopes: unknown actions {sorted(unknown)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthConfig:
        """The configuration of ``settings``: its trusted issuers (the built-in one when
        ``oidc_issuer`` is empty), audience, allowed and admin groups."""
        return cls(
            issuers=list(settings.trusted_issuers),
            audience=settings.oidc_audience,
            allowed_groups=list(settings.allowed_groups),
            admin_groups=list(settings.admin_groups),
        )


def _issuer_key(issuer: str) -> str:
    return issuer.rstrip("/")


def _b64json(segment: str, part: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as err:
        raise _invalid(f"malformed bearer token: its {part} is not base64url-encoded JSON") from err
    if not isinstance(value, dict):
        raise _invalid(f"malformed bearer token: its {part} is not a JSON object")
    return value


def _claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path``, preferring literal keys that contain dots."""
    if path in claims:
        return claims[path]
    head, dot, rest = path.partition(".")
    while dot:
        if isinstance(claims.get(head), Mapping):
            found = _claim_path(claims[head], rest)
            if found is not None:
                return found
        more, dot, rest = rest.partition(".")
        head = f"{head}.{more}"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [str(item) for item in value if isinstance(item, str | int)]
    return []


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class _KeySet:
    """The verification keys of one issuer, as last fetched."""

    by_kid: dict[str, Key] = field(default_factory=dict)
    unnamed: list[Key] = field(default_factory=list)
    fetched_at: float = float("-inf")
    attempted_at: float = float("-inf")
    failure: str | None = None

    def candidates(self, kid: str | None) -> list[Key]:
        if kid is not None:
            return [self.by_kid[kid]] if kid in self.by_kid else []
        return [*self.by_kid.values(), *self.unnamed]


@dataclass(frozen=True)
class _Verified:
    """A token that passed: trusted until ``until`` while ``keys`` are its issuer's keys."""

    principal: Principal
    until: float
    keys: _KeySet

    def trusted(self, current: _KeySet | None) -> bool:
        return current is self.keys and time.time() <= self.until


class TokenValidator:
    """Validates bearer JWTs against the configured issuers and authorizes principals.

    One instance per process (it caches the issuers' keys); ``http_client`` is used for
    discovery and JWKS requests when given, else a short-lived client per fetch.
    """

    def __init__(self, config: AuthConfig, http_client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._http = http_client
        self._issuers = {_issuer_key(i): i for i in config.issuers}
        self._keys: dict[str, _KeySet] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: verified tokens by SHA-256
        self._verified: dict[bytes, _Verified] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenValidator:
        return cls(AuthConfig.from_settings(settings))

    # -- authentication -------------------------------------------------------

    async def validate(self, token: str | None) -> Principal:
        """The principal of a valid ``token``; :class:`AuthError` (401) for any bad token."""
        digest = hashlib.sha256((token or "").strip().encode()).digest()
        known = self._verified.get(digest)
        if known is not None and known.trusted(self._keys.get(known.principal.issuer)):
            return known.principal
        try:
            verified = await self._validate(token)
        except AuthError as err:
            logger.debug("refused a bearer token: %s", err.message)
            raise
        if self.config.verified_token_ttl > 0:
            if len(self._verified) >= self.config.max_verified_tokens:
                self._verified.clear()
            self._verified[digest] = verified
        return verified.principal

    async def _validate(self, token: str | None) -> _Verified:
        token = (token or "").strip()
        if not token:
            raise _invalid("missing bearer token")
        if len(token) > self.config.max_token_bytes:
            raise _invalid(f"bearer token longer than {self.config.max_token_bytes} bytes")
        parts = token.split(".")
        if len(parts) == 5:
            raise _invalid("encrypted tokens (JWE) are not supported; send a signed JWT")
        if len(parts) != 3 or not all(parts[:2]):
            raise _invalid("malformed bearer token: a JWT has three dot-separated parts")
        header = _b64json(parts[0], "header")
        claims = _b64json(parts[1], "payload")

        alg = self._check_header(header)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise _invalid("token has no issuer (iss)")
        if _issuer_key(issuer) not in self._issuers:
            raise _invalid(f"untrusted token issuer {_show(issuer)}")
        issuer = self._issuers[_issuer_key(issuer)]  # as configured (trailing slash or not)

        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("malformed bearer token: its key id (kid) is not a string")
        keys = await self._verification_keys(issuer, kid, alg)
        key_set = self._keys[issuer]
        if not any(self._signature_ok(token, key, alg) for key in keys):
            raise _invalid(f"invalid token signature (issuer {issuer})")

        self._check_claims(claims)
        until = min(
            claims["exp"] + self.config.leeway, time.time() + self.config.verified_token_ttl
        )
        return _Verified(self._principal(claims, issuer), until, key_set)

    def _check_header(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise _invalid("malformed bearer token: its header names no algorithm (alg)")
        if alg.lower() == "none":
            raise _invalid("unsigned token (alg 'none') refused")
        if alg.upper().startswith("HS"):
            raise _invalid(
                f"token algorithm {_show(alg)} refused: HMAC-signed tokens are not accepted"
            )
        if alg not in self.config.algorithms:
            raise _invalid(
                f"token algorithm {_show(alg)} not allowed; "
                f"allowed: {', '.join(self.config.algorithms)}"
            )
        if header.get("crit"):
            raise _invalid(
                "token header has critical extensions (crit) this service does not support"
            )
        return alg

    def _signature_ok(self, token: str, key: Key, alg: str) -> bool:
        try:
            jws.deserialize_compact(token, key, algorithms=[alg])
        except (JoseError, ValueError):
            return False
        return True

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        leeway = self.config.leeway
        now = time.time()
        audience = claims.get("aud")
        if audience is None:
            raise _invalid("token has no audience (aud)")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or self.config.audience not in audiences:
            raise _invalid(
                f"token audience {_show(audience)} does not include {self.config.audience!r}"
            )
        exp = claims.get("exp")
        if not _is_time(exp):
            raise _invalid("token has no valid expiry time (exp)")
        if now > exp + leeway:
            raise _invalid(f"token expired {int(now - exp)} s ago")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_time(nbf) or nbf > now + leeway):
            raise _invalid(f"token not valid yet (nbf is {_show(nbf)}, now is {int(now)})")
        iat = claims.get("iat")
        if iat is not None and (not _is_time(iat) or iat > now + leeway):
            raise _invalid(f"token issued in the future (iat is {_show(iat)}, now is {int(now)})")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _invalid("token has no subject (sub)")

    def _principal(self, claims: Mapping[str, Any], issuer: str) -> Principal:
        groups: dict[str, None] = {}
        for path in self.config.group_claims:
            value = _claim_path(claims, path.format(audience=self.config.audience))
            if isinstance(value, list):  # a group name may contain spaces: no str splitting
                groups.update(dict.fromkeys(str(g) for g in value if isinstance(g, str)))
        scopes = dict.fromkeys([*_strings(claims.get("scope")), *_strings(claims.get("scp"))])
        name = claims.get("name") or claims.get("preferred_username")
        group_tuple = tuple(groups)
        return Principal(
            sub=claims["sub"],
            issuer=issuer,
            groups=group_tuple,
            scopes=tuple(scopes),
            name=name if isinstance(name, str) else None,
            is_admin=groups_match(group_tuple, self.config.admin_groups),
        )

    # -- keys -----------------------------------------------------------------

    async def _verification_keys(self, issuer: str, kid: str | None, alg: str) -> list[Key]:
        """Keys of ``issuer`` that may verify a token with ``kid`` and ``alg``."""
        cfg = self.config
        current = self._keys.get(issuer)
        now = time.monotonic()
        if current is None or (
            now - current.fetched_at > cfg.jwks_max_age
            and now - current.attempted_at >= cfg.jwks_refresh_interval
        ):
            current = await self._refresh(issuer, current)
        keys = current.candidates(kid)
        # Rotation: the issuer may have a key we have not seen. Refresh, but not more
        # than once per interval, whatever kids the tokens claim.
        if (
            not keys
            and kid is not None
            and time.monotonic() - current.attempted_at >= cfg.jwks_refresh_interval
        ):
            current = await self._refresh(issuer, current)
            keys = current.candidates(kid)
        if not keys:
            if current.failure and not current.by_kid and not current.unnamed:
                raise AuthError(
                    503, f"cannot fetch the signing keys of issuer {issuer}: {current.failure}"
                )
            raise _invalid(f"token signed with key id {_show(kid)} unknown to issuer {issuer}")
        usable = [key for key in keys if _key_fits(key, alg)]
        if not usable:
            key = keys[0]
            raise _invalid(
                f"token algorithm {alg} does not fit key {key.kid or '(no kid)'} of issuer "
                f"{issuer} ({key.key_type} key)"
            )
        return usable

    async def _refresh(self, issuer: str, seen: _KeySet | None) -> _KeySet:
        """Fetch ``issuer``'s keys unless another task did while we waited for the lock."""
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            latest = self._keys.get(issuer)
            if latest is not None and latest is not seen:
                return latest
            entry = _KeySet(attempted_at=time.monotonic())
            try:
                found = await self._fetch_keys(issuer)
            except _FetchError as err:
                logger.warning("cannot fetch the signing keys of issuer %s: %s", issuer, err)
                if seen is not None:  # keep serving with the keys we have
                    entry.by_kid, entry.unnamed, entry.fetched_at = (
                        seen.by_kid,
                        seen.unnamed,
                        seen.fetched_at,
                    )
                entry.failure = str(err)
            else:
                for key in found:
                    if key.kid:
                        entry.by_kid[key.kid] = key
                    else:
                        entry.unnamed.append(key)
                entry.fetched_at = entry.attempted_at
                logger.info("issuer %s: %d signing keys", issuer, len(found))
            self._keys[issuer] = entry
            return entry

    async def _fetch_keys(self, issuer: str) -> list[Key]:
        discovery_url = issuer.rstrip("/") + _DISCOVERY_PATH
        doc = await self._get_json(discovery_url)
        if not isinstance(doc.get("issuer"), str) or _issuer_key(doc["issuer"]) != _issuer_key(
            issuer
        ):
            raise _FetchError(f"{discovery_url} names issuer {_show(doc.get('issuer'))}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise _FetchError(f"{discovery_url} has no http(s) jwks_uri")
        key_set = await self._get_json(jwks_uri)
        if not isinstance(key_set.get("keys"), list):
            raise _FetchError(f"{jwks_uri} is not a JWK Set (no 'keys' list)")
        return list(_import_keys(key_set["keys"], jwks_uri))

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            if self._http is not None:
                response = await self._http.get(url, timeout=self.config.http_timeout)
            else:
                async with httpx.AsyncClient(timeout=self.config.http_timeout) as client:
                    response = await client.get(url)
        except httpx.HTTPError as err:
            raise _FetchError(f"{url}: {type(err).__name__} {err}".rstrip()) from err
        if response.status_code != 200:
            raise _FetchError(f"{url} answered HTTP {response.status_code}")
        try:
            value = response.json()
        except ValueError as err:
            raise _FetchError(f"{url} did not answer JSON") from err
        if not isinstance(value, dict):
            raise _FetchError(f"{url} did not answer a JSON object")
        return value

    # -- authorization --------------------------------------------------------

    def authorize(self, principal: Principal, action: Action) -> None:
        """Raise :class:`AuthError` (403) unless ``principal`` may do ``action``.

        ``use`` needs one of ``allowed_groups`` (any group when it is empty) or admin;
        ``submit`` also needs one of the submit scopes; ``admin`` needs an admin group.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        cfg = self.config
        who = principal.name or principal.sub
        if action == "admin" and not principal.is_admin:
            raise _forbidden(
                f"{who} is not an administrator (needs group {' or '.join(cfg.admin_groups)})"
            )
        if cfg.allowed_groups and not (
            principal.is_admin or principal.in_groups(cfg.allowed_groups)
        ):
            raise _forbidden(
                f"{who} is not in a group allowed to use this service "
                f"({', '.join(cfg.allowed_groups)})"
            )
        needed = cfg.required_scopes.get(action) or []
        if needed and not set(needed) & set(principal.scopes):
            raise AuthError(
                403,
                f"token lacks the scope to {_ACTION_VERBS[action]}: needs {' or '.join(needed)}",
                error="insufficient_scope",
                scope=" ".join(needed),
            )

    async def authenticate(self, token: str | None, action: Action = "use") -> Principal:
        """:meth:`validate` then :meth:`authorize`."""
        principal = await self.validate(token)
        self.authorize(principal, action)
        return principal


class _FetchError(Exception):
    """Discovery or JWKS could not be fetched or made no sense."""


def _key_fits(key: Key, alg: str) -> bool:
    """Whether ``key`` is of the type (and curve) ``alg`` needs and not restricted otherwise."""
    kty, curve = ALGORITHM_KEYS[alg]
    if key.key_type != kty:
        return False
    if curve is not None and isinstance(key, ECKey) and key.curve_name != curve:
        return False
    declared = key.get("alg")
    return declared in (None, alg)


def _import_keys(items: Sequence[Any], source: str) -> Iterable[Key]:
    """Signature keys of a JWK Set; keys for encryption or of other types are skipped."""
    for item in items:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        if item.get("kty") not in ("RSA", "EC"):
            continue
        try:
            key = JWKRegistry.import_key(item)
        except (JoseError, ValueError, TypeError) as err:
            logger.warning("%s: skipping key %s: %s", source, item.get("kid"), err)
            continue
        if isinstance(key, RSAKey | ECKey):
            yield key
