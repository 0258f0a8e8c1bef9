"""Real XRootD servers on loopback: an origin serving a temporary folder (``run_xrootd``)
and a proxy-cache in front of one (``run_xcache``).

Use them from a module-scoped fixture::

    @pytest.fixture(scope="module")
    def xrootd_server():
        with run_xrootd() as server:
            yield server
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, SESSION_XROOTD_PORT

from mlaas4hep.platform import xrootd_server
from mlaas4hep.platform.xrootd_server import XRootDServer

__all__ = [
    "XCACHE_CONFIG",
    "XCache",
    "XRootDServer",
    "run_xcache",
    "run_xrootd",
    "session_xrootd",
]

#: The proxy-cache configuration the Kubernetes ConfigMap is generated from.
XCACHE_CONFIG = REPO / "k8s" / "base" / "xcache" / "xcache.cfg"


def _need_xrootd() -> None:
    if xrootd_server.XROOTD is None:
        pytest.skip("xrootd is not installed")


@contextmanager
def run_xrootd(port: int | None = None) -> Iterator[XRootDServer]:
    """The package's ``run_xrootd``; the test is skipped when xrootd is not installed."""
    _need_xrootd()
    with xrootd_server.run_xrootd(port) as server:
        yield server


@pytest.fixture(scope="session")
def session_xrootd() -> Iterator[XRootDServer]:
    """The session's xrootd, on the port the session platform's ``allowed_data_hosts`` lists."""
    with run_xrootd(SESSION_XROOTD_PORT) as server:
        yield server


@dataclass
class XCache:
    """``url`` is the root:// prefix of the proxy; ``cache`` the folder it caches into."""

    url: str
    cache: Path


@contextmanager
def run_xcache(origin_url: str) -> Iterator[XCache]:
    """Start an XCache (``XCACHE_CONFIG``) reading from the origin at ``origin_url``."""
    _need_xrootd()
    base = xrootd_server.server_folder("mlaas4hep-xcache-")
    cache = base / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    origin = origin_url.removeprefix("root://").split("/", 1)[0]
    env = {
        "XCACHE_ORIGIN": origin,
        "XCACHE_DIR": str(cache),
        "XCACHE_ADMIN_DIR": str(base / "admin"),
        "XCACHE_ALLOW_HOSTS": "localhost",
    }
    with xrootd_server.serve(XCACHE_CONFIG, base, env) as port:
        yield XCache(f"root://127.0.0.1:{port}/", cache)
