"""The Ray cluster's own token: where it is kept, created and read.

Ray's token authentication guards the dashboard, the Jobs API and the GCS; the platform's
clients of those send it, and user code must never see it (:mod:`mlaas4hep.auth.redact`
hides it from logs; the sandbox of ``model.py`` keeps its file out of reach).
"""

import os
import secrets
from pathlib import Path

RAY_TOKEN_ENV = "RAY_AUTH_TOKEN"
RAY_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


class RayTokenMissing(RuntimeError):
    """No Ray token is configured: the platform was never brought up here."""


def ray_token_path() -> Path:
    """Where Ray reads its cluster token: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    return Path(os.environ.get(RAY_TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def ensure_ray_token() -> None:
    """Create Ray's cluster token (mode 0600) unless one is already configured."""
    if os.environ.get(RAY_TOKEN_ENV):
        return
    path = ray_token_path()
    if path.is_file() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(secrets.token_hex(32))


def ray_token() -> str:
    """The cluster token, for clients of Ray's dashboard and Jobs API."""
    token = os.environ.get(RAY_TOKEN_ENV)
    if token:
        return token.strip()
    path = ray_token_path()
    if not path.is_file():
        raise RayTokenMissing(f"no Ray token: {path} does not exist (is the platform up?)")
    return path.read_text().strip()
