"""Shared fixtures: one Ray cluster per test session, isolated platform home, test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real ROOT test files (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: clone beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def platform_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the platform's home and storage at a temporary folder for the whole session."""
    home = tmp_path_factory.mktemp("mlaas4hep-home")
    os.environ["MLAAS4HEP_HOME"] = str(home)
    os.environ["MLAAS4HEP_STORAGE"] = str(home / "storage")
    return home


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster shared by every test of the session; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_cluster) -> str:
    """Base URL of the session's Ray Serve HTTP proxy on loopback."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
