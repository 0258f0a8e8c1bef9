"""Redaction of platform secrets from what a pipeline writes (its log, status, artifacts).

A :class:`Redactor` knows the secret values of this process's platform: the Ray cluster
token (``RAY_AUTH_TOKEN`` or the token file), the private members of the built-in
issuer's signing keys (``<home>/issuer/signing-keys.jwks``) and storage credentials in
the environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``). :meth:`Redactor.redact`
replaces each of them, and any PEM private key block, with ``[redacted]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlaas4hep.settings import Settings, load_settings

#: What a secret is replaced with.
MASK = "[redacted]"
#: Private members of an RSA/EC/symmetric JWK.
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
#: Environment variables holding storage credentials.
SECRET_ENV = ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Values shorter than this are not treated as secrets (they would mask ordinary text).
MIN_SECRET_CHARS = 12
PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S
)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _jwk_secrets(text: str) -> list[str]:
    """Private members of every key of a JWK Set document (empty when it is not one)."""
    try:
        keys = json.loads(text).get("keys", [])
    except (ValueError, AttributeError):
        return []
    return [
        str(key[member])
        for key in keys
        if isinstance(key, dict)
        for member in PRIVATE_JWK_MEMBERS
        if isinstance(key.get(member), str)
    ]


@dataclass(frozen=True)
class Redactor:
    """Replaces known secret values (longest first) in text."""

    secrets: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The secrets of the platform ``settings`` describe, read now."""
        from mlaas4hep.auth.ray_token import ray_token_path

        values = [os.environ.get(name, "") for name in SECRET_ENV]
        values.append(_read(ray_token_path()).strip())
        key_dir = settings.issuer_key_dir
        if key_dir.is_dir():
            for path in sorted(key_dir.iterdir()):
                if path.is_file():
                    values += _jwk_secrets(_read(path))
        kept = {v for v in values if len(v) >= MIN_SECRET_CHARS}
        return cls(tuple(sorted(kept, key=len, reverse=True)))

    @classmethod
    def from_environment(cls) -> Redactor:
        """The secrets of the platform configured in this process's environment."""
        return cls.from_settings(load_settings())

    def redact(self, text: str) -> str:
        """``text`` with every secret value and PEM private key replaced by ``[redacted]``."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return PEM_PRIVATE_KEY.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that formats each record and redacts its message and traceback."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.redact(record.exc_text)
        return True
