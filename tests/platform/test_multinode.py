"""A Ray cluster of three nodes on one machine: a head and two workers (``ray start``).

The cluster is this module's own (its own ports and temp folders), apart from the test
session's head, and is fully stopped at the end. One worker is the data node: the pipeline
pins its read tasks there; each worker has one training slot, so the two Train workers run
on two different nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import STOP_TIMEOUT

from mlaas4hep.cli.quickstart import write_demo_inputs
from mlaas4hep.pipeline.jobs import PipelineJobs
from mlaas4hep.platform.cluster import (
    HeadState,
    WorkerNode,
    loopback_settings,
    ray_env,
    ray_temp_dir,
    start_head,
    start_worker,
    stop_head,
    stop_worker,
)
from mlaas4hep.settings import Settings
from mlaas4hep.store.runs import RunStore, new_run_id
from mlaas4hep.store.storage import Storage

DATA_NODE = {"data_node": 1.0, "train_slot": 1.0}
COMPUTE_NODE = {"train_slot": 1.0}
#: Seconds a node may take to start: generous, the machine may be busy with other work.
START_TIMEOUT = 300.0


@dataclass
class Cluster:
    settings: Settings
    head: HeadState
    data_node: WorkerNode
    compute_node: WorkerNode


def _cluster_processes(settings: Settings) -> list[psutil.Process]:
    """Processes whose command line names this cluster's temp folders or GCS port."""
    markers = (str(ray_temp_dir(settings)), f":{settings.ray_port}")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if any(marker in cmdline for marker in markers):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("multinode")
    settings = loopback_settings(home, num_cpus=1)
    head = start_head(settings, timeout=START_TIMEOUT)
    workers: list[WorkerNode] = []
    try:
        base = ray_temp_dir(settings)
        # One after the other: two raylets registering at once on a loaded 2-core machine
        # can miss Ray's registration deadline.
        for name, resources in (("data", DATA_NODE), ("compute", COMPUTE_NODE)):
            folder = Path(f"{base}-{name}")
            workers.append(
                start_worker(head.gcs_address, folder, 2, resources, timeout=START_TIMEOUT)
            )
        data_node, compute_node = sorted(workers, key=lambda w: "data_node" not in w.resources)
        yield Cluster(settings, head, data_node, compute_node)
    finally:
        for worker in workers:
            stop_worker(worker, timeout=STOP_TIMEOUT)
        stop_head(settings, timeout=STOP_TIMEOUT, keep_logs=False)
    assert _cluster_processes(settings) == [], "processes of the test cluster outlived it"


def _wait_for_job(jobs: PipelineJobs, job_id: str, timeout: float = 420.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = jobs.view(job_id)
        if view is not None and view.state in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            return view.state
        time.sleep(0.5)
    raise AssertionError(f"pipeline job {job_id} did not finish in {timeout:.0f} s")


@pytest.fixture(scope="module")
def pinned_spec(tmp_path_factory) -> Path:
    """The demo spec with its reads pinned to the data node, one Train worker per slot."""
    folder = tmp_path_factory.mktemp("multinode-demo")
    spec_path = write_demo_inputs(folder, events=300, epochs=1)
    spec = yaml.safe_load(spec_path.read_text())
    spec["name"] = "multinode"
    spec["chunk_size"] = 100
    spec["resources"] = {
        "num_workers": 2,
        "resources_per_worker": {"train_slot": 1.0},
        "read_resources": {"data_node": 0.01},
    }
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.fixture(scope="module")
def pipeline_run(cluster: Cluster, pinned_spec: Path) -> str:
    """The pipeline as a Ray Job on the three-node cluster, followed to its end."""
    jobs = PipelineJobs(cluster.head.dashboard_url)
    run_id = new_run_id()
    env = {"MLAAS4HEP_STORAGE": cluster.settings.storage, "MLAAS4HEP_HOME": cluster.settings.home}
    jobs.submit(run_id, "physicist", str(pinned_spec), env_vars=env)
    state = _wait_for_job(jobs, run_id)
    assert state == "SUCCEEDED", jobs.logs(run_id)[-3000:]
    return run_id


# A driver on the cluster: the platform's read of the pinned spec, with a probe fused into
# each read task (same resources, so Ray Data runs both in one task) reporting its node.
READ_PROBE = """
import json, sys
import pyarrow as pa
import ray
from mlaas4hep.spec import load_spec
from mlaas4hep.data.datasource import read_events

def node_of(batch):
    node = ray.get_runtime_context().get_node_id()
    return pa.table({"node": [node] * batch.num_rows})

ray.init(address=sys.argv[1], log_to_driver=False)
spec = load_spec(sys.argv[2])
args = {"resources": spec.resources.read_resources}
ds = read_events(spec).map_batches(node_of, batch_format="pyarrow", **args)
nodes = sorted(set(ds.to_pandas()["node"]))
print(json.dumps({"nodes": nodes, "stats": ds.stats()}))
"""


def _read_task_nodes(cluster: Cluster, spec: Path) -> tuple[set[str], str]:
    command = [sys.executable, "-c", READ_PROBE, cluster.head.gcs_address, str(spec)]
    result = subprocess.run(
        command, env=ray_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return set(report["nodes"]), report["stats"]


def _state_api(cluster: Cluster):
    from ray.util.state import StateApiClient

    from mlaas4hep.auth.ray_token import ray_token

    headers = {"Authorization": f"Bearer {ray_token()}", "Content-Type": "application/json"}
    return StateApiClient(address=cluster.head.dashboard_url, headers=headers)


def _node_ids(cluster: Cluster, resource: str, name_prefix: str, field: str) -> set[str]:
    """Nodes of the cluster's tasks or actors whose ``field`` starts with ``name_prefix``."""
    from ray.util.state.common import ListApiOptions, StateResource

    client = _state_api(cluster)
    rows = client.list(
        StateResource(resource),
        options=ListApiOptions(detail=True, limit=10_000),
        raise_on_missing_output=False,
    )
    return {
        row["node_id"]
        for row in (r if isinstance(r, dict) else r.__dict__ for r in rows)
        if str(row.get(field) or "").startswith(name_prefix) and row.get("node_id")
    }


def test_pipeline_trains_on_two_nodes_of_the_cluster(cluster: Cluster, pipeline_run: str) -> None:
    record = RunStore(Storage(cluster.settings.storage)).get(pipeline_run)
    assert record["state"] == "SUCCEEDED" and record["model"]["name"] == "multinode"
    train_nodes = _node_ids(cluster, "actors", "RayTrainWorker", "class_name")
    assert train_nodes == {cluster.data_node.node_id, cluster.compute_node.node_id}


def test_pinned_read_tasks_run_on_the_data_node(cluster: Cluster, pinned_spec: Path) -> None:
    nodes, stats = _read_task_nodes(cluster, pinned_spec)
    assert "ReadROOT->MapBatches(node_of)" in stats  # the probe ran inside the read tasks
    assert nodes == {cluster.data_node.node_id}


def test_worker_nodes_carry_their_custom_resources(cluster: Cluster) -> None:
    from ray.util.state.common import ListApiOptions, StateResource

    nodes = _state_api(cluster).list(
        StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
    )
    by_id = {(n if isinstance(n, dict) else n.__dict__)["node_id"]: n for n in nodes}
    by_id = {k: (v if isinstance(v, dict) else v.__dict__) for k, v in by_id.items()}
    assert len(by_id) == 3
    assert by_id[cluster.data_node.node_id]["resources_total"]["data_node"] == 1.0
    assert "data_node" not in by_id[cluster.compute_node.node_id]["resources_total"]
    assert by_id[cluster.compute_node.node_id]["resources_total"]["train_slot"] == 1.0
