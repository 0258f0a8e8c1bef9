"""The embedded default: a local Ray head with token authentication, started and stopped.

``start_head`` runs ``ray start --head`` on loopback with Ray's token authentication on,
``stop_head`` ends exactly the processes of that head (never other Ray clusters on the
machine), and :class:`HeadState` records what was started in the platform's state folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from mlaas4hep.auth.ray_token import ensure_ray_token
from mlaas4hep.settings import Settings

#: Tries of each ``ray start`` (see ``_ray_start``).
START_ATTEMPTS = 2


class ClusterError(RuntimeError):
    """The local head could not be started, reached or stopped."""


def ray_env() -> dict[str, str]:
    """Environment for Ray processes and clients: token authentication on, venv on PATH."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    # Legacy Keras for every Ray worker: Keras 3 fails under MultiWorkerMirroredStrategy.
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def haproxy_dir(settings: Settings) -> Path:
    """HAProxy's folder for this head: short, as Serve adds a 56-character subfolder and
    HAProxy refuses socket paths over 97 characters."""
    return Path(tempfile.gettempdir()) / f"mlaas4hep-hap-{settings.ray_port}"


def serve_proxy_env(settings: Settings) -> dict[str, str]:
    """Environment that puts the head's Serve apps behind ``settings.serve_proxy``.

    Serve's controller, proxies and replicas read these flags when they start, so they go
    to ``ray start``: the processes of the head inherit them. With ``haproxy``, HAProxy
    listens on ``settings.port`` and forwards to ingress replicas that serve HTTP
    themselves on ports ``port + 1 … port + 64``; its files sit in
    :func:`haproxy_dir`.
    """
    if settings.serve_proxy != "haproxy":
        return {}
    folder = haproxy_dir(settings)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),  # default 8404: one head per host
        # Serve's default, 4 threads, outnumbers the cores of a small machine, where
        # HAProxy's threads then queue behind each other and the replicas.
        "RAY_SERVE_HAPROXY_NBTHREAD": os.environ.get(
            "RAY_SERVE_HAPROXY_NBTHREAD", str(min(4, os.cpu_count() or 1))
        ),
        # Serve's default retries only connections that failed before the request was
        # sent: the requests in flight on a replica that dies are then lost (the client's
        # connection closes without an answer). Retrying an empty response too sends
        # them to another replica. HAProxy replays only requests that fit its 16 kB
        # buffer (predictions, not uploads); a small submission whose replica died after
        # recording it may then be recorded twice, never lost.
        "RAY_SERVE_HAPROXY_RETRY_ON": os.environ.get(
            "RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response"
        ),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(settings.port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(settings.port + 64),
    }


@dataclass
class HeadState:
    """What ``start_head`` started, saved as JSON in the state folder."""

    gcs_address: str
    dashboard_url: str
    session_dir: str
    num_cpus: int
    started: float

    @staticmethod
    def path(settings: Settings) -> Path:
        return settings.state_dir / "head.json"

    def save(self, settings: Settings) -> None:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.path(settings).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, settings: Settings) -> HeadState | None:
        path = cls.path(settings)
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_settings(home: Path, num_cpus: int, **overrides) -> Settings:
    """Settings of a private platform under ``home``, on free loopback ports."""
    from mlaas4hep.settings import load_settings

    return load_settings(
        home=str(home),
        storage=str(home / "storage"),
        port=free_port(),
        grpc_port=free_port(),
        ray_port=free_port(),
        dashboard_port=free_port(),
        num_cpus=num_cpus,
        **overrides,
    )


def default_num_cpus() -> int:
    """Logical CPUs for the local head.

    More than the cores: Serve replicas ask fractions, but two Train workers plus Ray Data
    read tasks need whole CPUs at once, and a head with only 2 would deadlock a pipeline.
    """
    return max(4, os.cpu_count() or 1)


def _ray_cli() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's temp folder for this head.

    One per head: Ray's job supervisor finds "its" cluster through ``ray_current_cluster``
    in the temp folder, so two heads sharing ``/tmp/ray`` would run each other's jobs.
    Kept short, as Ray puts Unix sockets below it.
    """
    return Path(tempfile.gettempdir()) / f"mlaas4hep-ray-{settings.ray_port}"


def head_is_running(state: HeadState | None) -> bool:
    if state is None:
        return False
    host, port = state.gcs_address.rsplit(":", 1)
    return port_open(host, int(port))


def start_head(settings: Settings, timeout: float = 120.0) -> HeadState:
    """Start a Ray head on loopback with token authentication, or reuse the running one;
    its worker processes (Serve replicas, HAProxy) run at ``settings.worker_niceness``."""
    state = HeadState.load(settings)
    if head_is_running(state):
        return state  # type: ignore[return-value]
    if port_open("127.0.0.1", settings.ray_port):
        raise ClusterError(
            f"port {settings.ray_port} is taken by another process: set MLAAS4HEP_RAY_PORT"
        )
    if port_open("127.0.0.1", settings.dashboard_port):
        raise ClusterError(
            f"dashboard port {settings.dashboard_port} is taken: set MLAAS4HEP_DASHBOARD_PORT"
        )
    ensure_ray_token()
    num_cpus = settings.num_cpus or default_num_cpus()
    command = [
        _ray_cli(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={settings.ray_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={settings.dashboard_port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={ray_temp_dir(settings)}",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        *_node_port_args(),
    ]
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.state_dir / "ray-start.log"

    def cleanup() -> None:  # a start that failed half-way leaves processes running
        _terminate(_head_processes(str(ray_temp_dir(settings))), 10.0)
        _terminate(_client_servers_of(f"127.0.0.1:{settings.ray_port}"), 10.0)

    proxy_env = serve_proxy_env(settings)
    if proxy_env:
        haproxy_dir(settings).mkdir(parents=True, exist_ok=True)
    env = {**ray_env(), **proxy_env, "RAY_worker_niceness": str(settings.worker_niceness)}
    status = _ray_start(command, log_path, timeout, cleanup, env)
    if status != 0:
        tail = log_path.read_text()[-2000:]
        raise ClusterError(f"ray start failed ({status}); see {log_path}:\n{tail}")
    gcs_address = f"127.0.0.1:{settings.ray_port}"
    state = HeadState(
        gcs_address=gcs_address,
        dashboard_url=settings.jobs_url,
        session_dir=_session_dir_of(settings.ray_port),
        num_cpus=num_cpus,
        started=time.time(),
    )
    state.save(settings)
    _wait_for(lambda: port_open("127.0.0.1", settings.dashboard_port), timeout, "dashboard")
    return state


def _ray_start(
    command: list[str],
    log_path: Path,
    timeout: float,
    cleanup: Callable[[], None],
    env: dict[str, str] | None = None,
) -> int | str:
    """Run ``ray start``, logging to ``log_path``: 0, or what went wrong (exit status, timeout).

    A failed start is cleaned up (``cleanup`` ends what it left running) and tried once more:
    Ray gives a new raylet and dashboard 30 s to come up, which a loaded machine can miss.
    """
    status: int | str = 0
    for _ in range(START_ATTEMPTS):
        with log_path.open("w") as log:
            try:
                result = subprocess.run(
                    command,
                    env=env or ray_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
                status = result.returncode and f"exit {result.returncode}"
            except subprocess.TimeoutExpired:
                status = f"no answer in {timeout:.0f} s"
        if status == 0:
            return 0
        cleanup()
    return status


def _node_port_args() -> list[str]:
    """Free ports for a node's agents: Ray's fixed defaults would clash with any other node
    on the machine."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def connect(address: str, attempts: int = 3, **init_kwargs) -> None:
    """``ray.init(address=...)``, retried: a just-started head on a busy machine may not
    answer the first connection in time."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **init_kwargs)
            return
        except ConnectionError:
            if attempt == attempts:
                raise
            time.sleep(2.0 * attempt)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for the {what}")


def _session_dir_of(gcs_port: int) -> str:
    """Session folder of the head whose GCS listens on ``gcs_port`` (from its process)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not any(arg.endswith("gcs_server") for arg in cmdline[:1]):
            continue
        if not any(arg == f"--gcs_server_port={gcs_port}" for arg in cmdline):
            continue
        for arg in cmdline:
            if arg.startswith("--log_dir="):
                return str(Path(arg.split("=", 1)[1]).parent)
    raise ClusterError(f"no Ray GCS process found on port {gcs_port}")


def _head_processes(session_dir: str) -> list[psutil.Process]:
    """Processes naming ``session_dir`` (a head's session folder, a worker node's temp
    folder) on their command line, with their children."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            if any(session_dir in arg for arg in proc.info.get("cmdline") or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found: dict[int, psutil.Process] = {}
    for root in roots:
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _client_servers_of(gcs_address: str) -> list[psutil.Process]:
    """The head's Ray Client server: its command line names the GCS port, not the session
    (and an address of the machine that may differ from ``gcs_address``'s host)."""
    suffix = ":" + gcs_address.rsplit(":", 1)[1]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "ray.util.client.server" in cmdline and any(
            arg.startswith("--address=") and arg.endswith(suffix) for arg in cmdline
        ):
            found.append(proc)
    return found


def head_processes(settings: Settings) -> list[psutil.Process]:
    """Every process of the head recorded in the state folder (none when none is): those
    naming its session folder and their children (raylet, GCS, workers, job drivers), its
    Ray Client server and its HAProxy; never those of another head."""
    state = HeadState.load(settings)
    if state is None:
        return []
    procs = _head_processes(state.session_dir) + _client_servers_of(state.gcs_address)
    return procs + _head_processes(str(haproxy_dir(settings)))


def stop_head(settings: Settings, timeout: float = 20.0, keep_logs: bool = True) -> bool:
    """Stop the head recorded in the state folder; return whether one was running.

    With ``keep_logs=False`` the head's session folder under Ray's temp dir is removed too.
    """
    state = HeadState.load(settings)
    if state is None:
        return False
    procs = head_processes(settings)
    _terminate(procs, timeout)
    HeadState.path(settings).unlink(missing_ok=True)
    shutil.rmtree(haproxy_dir(settings), ignore_errors=True)
    if not keep_logs:
        shutil.rmtree(Path(state.session_dir).parent, ignore_errors=True)
    return bool(procs)


def _terminate(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM ``procs``, then SIGKILL those still alive after ``timeout`` seconds."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)


@dataclass
class WorkerNode:
    """A worker node started by :func:`start_worker` on this machine."""

    node_id: str
    gcs_address: str
    temp_dir: str
    num_cpus: int
    resources: dict[str, float]


def start_worker(
    gcs_address: str,
    temp_dir: Path,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    timeout: float = 120.0,
) -> WorkerNode:
    """Join a worker node to the head at ``gcs_address`` (``ray start --address``).

    The node gets its own temp folder (its processes are found, and stopped, by it), free
    agent ports, ``num_cpus`` logical CPUs and the custom ``resources`` (e.g.
    ``{"data_node": 1}`` for a node near the data). Returns once the head lists the node.
    """
    resources = dict(resources or {})
    temp_dir.mkdir(parents=True, exist_ok=True)
    command = [
        _ray_cli(),
        "start",
        f"--address={gcs_address}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources)}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *_node_port_args(),
    ]
    log_path = temp_dir / "ray-start.log"
    status = _ray_start(
        command, log_path, timeout, lambda: _terminate(_head_processes(str(temp_dir)), 10.0)
    )
    if status != 0:
        tail = log_path.read_text()[-2000:]
        raise ClusterError(f"ray start of a worker node failed ({status}); see {log_path}:\n{tail}")
    found: list[str] = []

    def joined() -> bool:
        found.extend(_node_ids_in(gcs_address, str(temp_dir)))
        return bool(found)

    _wait_for(joined, timeout, f"worker node in {temp_dir} to join {gcs_address}")
    return WorkerNode(found[0], gcs_address, str(temp_dir), num_cpus, resources)


def _node_ids_in(gcs_address: str, temp_dir: str) -> list[str]:
    """Ids of the alive nodes of the cluster at ``gcs_address`` whose temp folder is
    ``temp_dir``, asked from its GCS (with the cluster token: ``RAY_AUTH_MODE=token``)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    alive = GcsNodeInfo.GcsNodeState.ALIVE
    nodes = GcsClient(address=gcs_address).get_all_node_info(timeout=10, state_filter=alive)
    return [info.node_id.hex() for info in nodes.values() if info.temp_dir == temp_dir]


def stop_worker(worker: WorkerNode, timeout: float = 20.0, keep_logs: bool = False) -> bool:
    """Stop the processes of ``worker`` (and only those); return whether any ran."""
    procs = _head_processes(worker.temp_dir)
    _terminate(procs, timeout)
    if not keep_logs:
        shutil.rmtree(worker.temp_dir, ignore_errors=True)
    return bool(procs)
