"""The embedded head: token authentication on, clients authenticated, clean stop."""

from __future__ import annotations

import httpx

from mlaas4hep.platform.cluster import HeadState, ray_token


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
