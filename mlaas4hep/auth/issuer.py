"""The built-in token issuer of the embedded default.

A laptop has no INDIGO IAM or Keycloak at hand, so the platform signs its own bearer
tokens: ``mlaas4hep token`` mints them with a local key and the API validates them
exactly as it validates an external issuer's, through OIDC discovery and the JWKS
served by :mod:`mlaas4hep.serve.apps.issuer_app`.

The signing keys live in one private JWK Set file (mode 0600) in ``key_dir``::

    {"current": "<kid>", "keys": [<private JWK>, ...]}      newest key last

:meth:`LocalIssuer.rotate` adds a key and keeps the previous ones (``keep`` in all),
so tokens signed before the rotation stay valid until they expire. Every process that
shares ``key_dir`` (the CLI, the Serve replica) rereads the file when it changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from joserfc import jwt
from joserfc.jwk import RSAKey

if TYPE_CHECKING:
    from mlaas4hep.settings import Settings

logger = logging.getLogger(__name__)

#: Name of the private JWK Set file in ``key_dir``.
KEY_FILE = "signing-keys.jwks"
SIGNING_ALG = "RS256"
RSA_KEY_SIZE = 2048
DEFAULT_SCOPE = "mlaas4hep.use mlaas4hep.submit"
WLCG_PROFILE_VERSION = "1.0"


class IssuerError(RuntimeError):
    """A key file that cannot be read or written."""


class LocalIssuer:
    """Signs RS256 JWTs for ``issuer_url`` with keys kept in ``key_dir``.

    The first use creates ``key_dir`` (mode 0700) and a key if there is none.
    """

    def __init__(
        self,
        key_dir: str | Path,
        issuer_url: str,
        audience: str = "mlaas4hep",
        keep: int = 3,
    ) -> None:
        if keep < 2:
            raise ValueError(
                f"keep={keep}: an issuer keeps at least the current and one previous key"
            )
        self.key_dir = Path(key_dir).expanduser()
        self.issuer_url = issuer_url.rstrip("/")
        self.audience = audience
        self.keep = keep
        self._keys: list[RSAKey] = []
        self._current: str = ""
        self._stamp: tuple[int, int, int] | None = None
        self._load()

    @property
    def key_file(self) -> Path:
        return self.key_dir / KEY_FILE

    @property
    def current_kid(self) -> str:
        """Key id of the key that signs new tokens."""
        self._load()
        return self._current

    # -- tokens ---------------------------------------------------------------

    def mint(
        self,
        sub: str,
        groups: Sequence[str] = (),
        scope: str = DEFAULT_SCOPE,
        ttl: int = 3600,
        **claims: Any,
    ) -> str:
        """A signed JWT for ``sub`` valid ``ttl`` seconds from now.

        Carries ``iss``, ``aud``, ``sub``, ``iat``, ``nbf``, ``exp``, ``jti``, ``scope``
        and the groups both as WLCG ``wlcg.groups`` and plain ``groups``; extra
        ``claims`` (``name``, or an ``exp`` for tests) are added or override these, and
        a claim given as ``None`` is left out. A ``ttl`` of 0 or less gives a token that
        has already expired, which tests use.
        """
        if not sub:
            raise ValueError("a token needs a subject (sub)")
        key = self._current_key()
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer_url,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
            "scope": scope,
            "wlcg.ver": WLCG_PROFILE_VERSION,
            "wlcg.groups": list(groups),
            "groups": list(groups),
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        header = {"alg": SIGNING_ALG, "kid": key.kid, "typ": "JWT"}
        return jwt.encode(header, payload, key, algorithms=[SIGNING_ALG])

    # -- public material ------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of public keys (current and previous), for ``/jwks``."""
        self._load()
        return {"keys": [_public_jwk(key) for key in self._keys]}

    def openid_configuration(self) -> dict[str, Any]:
        """The OIDC discovery document, for ``/.well-known/openid-configuration``.

        There is no token or authorization endpoint: tokens are minted locally by
        whoever can read ``key_dir`` (``mlaas4hep token``).
        """
        return {
            "issuer": self.issuer_url,
            "jwks_uri": f"{self.issuer_url}/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALG],
            "scopes_supported": DEFAULT_SCOPE.split(),
            "claims_supported": [
                "iss",
                "aud",
                "sub",
                "iat",
                "nbf",
                "exp",
                "jti",
                "scope",
                "wlcg.ver",
                "wlcg.groups",
                "groups",
                "name",
            ],
            "grant_types_supported": [],
        }

    # -- keys -----------------------------------------------------------------

    def rotate(self) -> str:
        """Make a new current signing key and return its kid; older keys stay in the JWKS."""
        with self._locked():
            self._load(force=True)
            self._keys = [*self._keys, _new_key()][-self.keep :]
            self._current = self._keys[-1].kid
            self._write()
        logger.info("issuer %s rotated its signing key to kid %s", self.issuer_url, self._current)
        return self._current

    def _current_key(self) -> RSAKey:
        self._load()
        for key in self._keys:
            if key.kid == self._current:
                return key
        raise IssuerError(f"{self.key_file}: current key {self._current!r} is not in the key set")

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.key_file.stat()
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _load(self, force: bool = False) -> None:
        """Read the key file if it changed since the last read; create it if there is none."""
        stamp = self._file_stamp()
        if stamp is None:
            if not self._keys:
                self._create()
            return
        if force or stamp != self._stamp:
            self._read(stamp)

    def _create(self) -> None:
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            if self._file_stamp() is not None:  # another process won the race
                self._read(self._file_stamp())
                return
            self._keys = [_new_key()]
            self._current = self._keys[0].kid
            self._write()
        logger.info(
            "issuer %s created signing key %s in %s", self.issuer_url, self._current, self.key_dir
        )

    def _read(self, stamp: tuple[int, int, int] | None) -> None:
        path = self.key_file
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning(
                "%s was readable by others (mode %o); restricting it to 0600", path, mode
            )
            path.chmod(0o600)
        try:
            data = json.loads(path.read_text())
            keys = [RSAKey.import_key(item) for item in data["keys"]]
            current = str(data.get("current") or keys[-1].kid)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise IssuerError(
                f"{path}: not a readable signing key set ({type(err).__name__})"
            ) from err
        if not keys or any(not key.is_private for key in keys):
            raise IssuerError(f"{path}: every signing key must be a private RSA key")
        self._keys, self._current, self._stamp = keys, current, stamp

    def _write(self) -> None:
        """Write the key set atomically with mode 0600 (mkstemp creates files 0600)."""
        data = {
            "current": self._current,
            "keys": [
                {**key.as_dict(private=True), "use": "sig", "alg": SIGNING_ALG}
                for key in self._keys
            ],
        }
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.key_dir)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.key_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._stamp = self._file_stamp()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on ``key_dir`` shared by every process that uses it."""
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.key_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __repr__(self) -> str:
        return f"LocalIssuer(issuer_url={self.issuer_url!r}, key_dir={str(self.key_dir)!r})"


def _new_key() -> RSAKey:
    return RSAKey.generate_key(
        RSA_KEY_SIZE, parameters={"use": "sig", "alg": SIGNING_ALG}, auto_kid=True
    )


def _public_jwk(key: RSAKey) -> dict[str, Any]:
    return {**key.as_dict(private=False), "use": "sig", "alg": SIGNING_ALG}


def builtin_issuer(settings: Settings) -> LocalIssuer:
    """The embedded default's issuer: keys in ``settings.issuer_key_dir``, its URL
    ``settings.builtin_issuer_url``."""
    return LocalIssuer(settings.issuer_key_dir, settings.builtin_issuer_url, settings.oidc_audience)
