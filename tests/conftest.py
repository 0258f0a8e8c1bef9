"""Shared fixtures: one Ray cluster per test session, isolated platform home, test data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mlaas4hep.data.rootio import load_xrootd_client
from mlaas4hep.platform.cluster import free_port

__all__ = ["STOP_TIMEOUT", "free_port"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Before any test module imports Ray or TensorFlow: Ray's token auth on, with the token in
# a session folder (never ~/.ray), and legacy Keras for Ray Train.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="mlaas4hep-tests-"))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_SESSION_DIR / "ray_auth_token")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["MLAAS4HEP_HOME"] = str(_SESSION_DIR / "home")
os.environ["MLAAS4HEP_STORAGE"] = str(_SESSION_DIR / "home" / "storage")
# Serve holds a stopping ingress replica reachable for 30 s behind HAProxy, so that an
# external load balancer can deregister it; on loopback HAProxy is the only router and
# retries refused connections, so one second keeps app deletes and head stops short.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
# Ray Train's controller looks at its workers every 2 s: a run's end (or a killed worker)
# is seen up to 2 s late, in each of the suite's many short runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# The XRootD client before TensorFlow (the other order crashes), as the pipeline does.
load_xrootd_client()

#: Seconds a test head's or worker's processes get to exit on SIGTERM before SIGKILL:
#: Ray's GCS and autoscaler monitor outwait the platform's 20 s, and what a test cluster
#: leaves is removed with it.
STOP_TIMEOUT = 3.0

#: Port of the session's loopback xrootd (xrootd_fixtures.session_xrootd), the one remote
#: data host on the session platform's allow-list.
SESSION_XROOTD_PORT = free_port()

#: The shared fixtures, each defined once for the whole suite (a session fixture imported
#: into several modules would start once per module): the inference app and its models,
#: the model-format bundles, the OIDC provider, in-process APIs, issuers, the xrootd.
pytest_plugins = [
    "serve_fixtures",
    "model_format_fixtures",
    "oidc_fixtures",
    "api_fixtures",
    "auth_fixtures",
    "xrootd_fixtures",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real ROOT test files (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: clone beside ../shared")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def platform_home() -> Path:
    """The platform's home (state, issuer key, storage) for the session; removed at the end."""
    home = _SESSION_DIR / "home"
    home.mkdir(parents=True, exist_ok=True)
    yield home
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def platform_settings(platform_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """Settings of the session's platform: free loopback ports, storage in the temp home.

    Six logical CPUs: the session keeps extra Serve test applications alive while two
    Train workers and Ray Data tasks must still be placed. Specs may read ``../shared/data``
    and the tests' temporary folders (shared data roots) and the session's xrootd; set in
    the environment, so the head's pipeline jobs check their specs with the same rules.
    """
    from mlaas4hep.settings import load_settings

    roots = f"{SHARED_DATA},{tmp_path_factory.getbasetemp()}"
    os.environ["MLAAS4HEP_SHARED_DATA_ROOTS"] = roots
    os.environ["MLAAS4HEP_ALLOWED_DATA_HOSTS"] = f"root://127.0.0.1:{SESSION_XROOTD_PORT}"

    return load_settings(
        port=free_port(),
        grpc_port=free_port(),
        ray_port=free_port(),
        dashboard_port=free_port(),
        num_cpus=6,
    )


@pytest.fixture(scope="session")
def ray_cluster(platform_settings):
    """One Ray head (``ray start``, token auth on) shared by every test of the session.

    The test process is connected to it as a driver; at the end the head's processes and
    session folder are removed, and nothing else on the machine is touched.
    """
    import ray

    from mlaas4hep.platform.cluster import start_head, stop_head

    # The head's processes write their temporary files (TensorFlow's autograph modules,
    # which killed workers leave behind) into the session folder, removed at the end.
    scratch = _SESSION_DIR / "tmp"
    scratch.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))
        head = start_head(platform_settings)
    ray.init(address=head.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()
    stop_head(platform_settings, timeout=STOP_TIMEOUT, keep_logs=False)


@pytest.fixture(scope="session")
def serve_url(ray_cluster, platform_settings) -> str:
    """Base URL of the session's Ray Serve HTTP proxy on loopback."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": platform_settings.port})
    yield platform_settings.api_url
    serve.shutdown()
