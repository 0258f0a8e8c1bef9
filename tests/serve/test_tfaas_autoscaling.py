"""The model deployment scales up under a burst of requests and back down after it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from serve_fixtures import ROUTE_PREFIX, make_bundle, wait_for

pytestmark = pytest.mark.ray

APP = "tfaas-autoscale"
PREFIX = "/tfaas-autoscale"
BURST_CLIENTS = 12
BURST_SECONDS = 45.0


def running_model_replicas() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    app = serve.status().applications.get(APP)
    if app is None or "ModelServer" not in app.deployments:
        return 0
    return app.deployments["ModelServer"].replica_states.get(ReplicaState.RUNNING, 0)


@pytest.fixture
def autoscaled(tfaas, platform_settings, tmp_path):
    """A TFaaS app whose model deployment autoscales within seconds (1 to 2 replicas,
    target of one ongoing request each) serving model ``burst``."""
    from ray import serve

    from mlaas4hep.serve.apps.inference import tfaas_application
    from mlaas4hep.serve.dataplane import TFaaSOptions

    options = TFaaSOptions(
        model_min_replicas=1,
        model_max_replicas=2,
        ingress_min_replicas=1,
        ingress_max_replicas=1,
        target_ongoing_requests=1,
        upscale_delay_s=0.5,
        downscale_delay_s=2.0,
        look_back_period_s=1.0,
        metrics_interval_s=0.5,
    )
    settings = platform_settings.model_copy(update={"grpc_port": 0})  # the session app's port
    serve.run(tfaas_application(settings, options), name=APP, route_prefix=PREFIX)
    tfaas.registry.register("burst", make_bundle(tmp_path / "b", "burst"), owner=tfaas.owner())
    yield tfaas.url.removesuffix(ROUTE_PREFIX) + PREFIX
    serve.delete(APP)


def test_model_deployment_scales_up_under_a_burst_then_back_down(tfaas, autoscaled):
    import httpx

    assert running_model_replicas() == 1
    rows = np.random.default_rng(0).normal(size=(256, 4)).round(3).tolist()
    body = {"values": rows, "model": "burst"}
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=autoscaled, headers=tfaas.headers(), timeout=30) as http:
            while not stop.is_set():
                statuses.append(http.post("/json", json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(BURST_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: running_model_replicas() == 2, timeout=BURST_SECONDS)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert statuses and set(statuses) == {200}
    wait_for(lambda: running_model_replicas() == 1, timeout=60)
