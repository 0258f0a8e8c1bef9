"""The embedded head: token authentication on, clients authenticated, clean stop."""

from __future__ import annotations

import os
import socket

import httpx

from mlaas4hep.auth.ray_token import ray_token
from mlaas4hep.platform.cluster import HeadState


def test_jobs_api_refuses_calls_without_ray_token(ray_cluster, platform_settings):
    response = httpx.get(f"{platform_settings.jobs_url}/api/jobs/", timeout=10)
    assert response.status_code == 401


def test_jobs_api_accepts_the_cluster_token(ray_cluster, platform_settings):
    headers = {"Authorization": f"Bearer {ray_token()}"}
    response = httpx.get(f"{platform_settings.jobs_url}/api/jobs/", headers=headers, timeout=10)
    assert response.status_code == 200


def test_head_state_records_the_running_head(ray_cluster, platform_settings):
    state = HeadState.load(platform_settings)
    assert state is not None
    assert state.gcs_address == f"127.0.0.1:{platform_settings.ray_port}"
    assert ray_cluster.cluster_resources()["CPU"] == state.num_cpus


def test_head_workers_run_at_the_configured_niceness_not_rays_15(ray_cluster, platform_settings):
    """Serve replicas and HAProxy are the head's workers: at Ray's default nice 15 any busy
    process on the machine (a load tool, a plain uvicorn) would take the CPU from them."""

    @ray_cluster.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_cluster.get(niceness.remote(), timeout=120) == platform_settings.worker_niceness == 0


def test_up_refuses_a_grpc_port_another_process_listens_on(tmp_path, monkeypatch, capsys):
    """The ingress replicas share the gRPC port (SO_REUSEPORT), so a server already there
    would silently take part of the connections: ``up`` stops before starting anything."""
    from mlaas4hep.cli.main import main

    monkeypatch.setenv("MLAAS4HEP_HOME", str(tmp_path))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["up", "--grpc-port", str(port), "--storage", str(tmp_path / "s")]) == 1
    assert f"gRPC port {port} is taken by another process" in capsys.readouterr().err
    assert not (tmp_path / "state" / "head.json").exists()
