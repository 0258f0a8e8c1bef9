"""Runs whose job ended or was lost are settled: none stays pending or running forever.

Real run records in a storage folder, the session's real Ray Jobs API, and the pipeline
API over HTTP; the lost jobs are what a head restart or a replica dying between
recording a run and submitting its job leaves behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from oidc_fixtures import OIDCProvider, api_settings, serve_apis

from mlaas4hep.pipeline.jobs import JobsUnavailable, PipelineJobs
from mlaas4hep.pipeline.reconcile import MAX_RESUBMITS, Reconciler, RunSettler
from mlaas4hep.store.runs import RunState, RunStore, new_run_id
from mlaas4hep.store.storage import Storage

pytestmark = pytest.mark.ray


def _settler(storage: Storage, jobs: PipelineJobs, grace: float = 0.0) -> RunSettler:
    return RunSettler(storage, RunStore(storage), jobs, grace_seconds=grace)


def _recorded(storage: Storage, name: str, owner: str = "alice", **fields) -> str:
    """A run recorded as the API records a submission (job id = run id), then updated
    with ``fields`` (e.g. ``state``, ``stage``) as its job would; returns its id."""
    runs = RunStore(storage)
    run_id = new_run_id()
    runs.create(run_id, owner=owner, name=name, job_id=run_id)
    if fields:
        runs.update(run_id, **fields)
    return run_id


def _wait_for_job_end(jobs: PipelineJobs, job_id: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = jobs.view(job_id)
        if view is not None and view.state not in {"PENDING", "RUNNING"}:
            return view.state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def test_unknown_jobs_are_none_and_an_unreachable_jobs_api_is_an_error(
    ray_cluster, platform_settings
) -> None:
    assert PipelineJobs(platform_settings.jobs_url).view(new_run_id()) is None
    with pytest.raises(JobsUnavailable, match="cannot be reached"):
        PipelineJobs("http://127.0.0.1:9").view(new_run_id())


def test_a_lost_submission_is_submitted_again_and_its_end_recorded(
    ray_cluster, platform_settings, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    runs = RunStore(storage)
    jobs = PipelineJobs(platform_settings.jobs_url)
    # Recorded, then the replica died before submitting: no job of that id exists.
    run_id = _recorded(storage, "lost")
    storage.write_json({"name": "lost", "files": []}, "runs", run_id, "spec.json")
    reconciler = Reconciler(_settler(storage, jobs))

    resubmitted = reconciler.reconcile_once()
    assert [(r["id"], r["state"], r["stage"]) for r in resubmitted] == [
        (run_id, "PENDING", "resubmitted")
    ]
    assert runs.get(run_id)["resubmits"] == 1
    # The job Ray now knows runs the stored spec, which has no files: it fails, and the
    # next round gives the record that end.
    assert _wait_for_job_end(jobs, run_id) == "FAILED"
    settled = reconciler.reconcile_once()
    assert [(r["id"], r["state"]) for r in settled] == [(run_id, "FAILED")]
    assert reconciler.reconcile_once() == []
    jobs.delete(run_id)


def test_a_run_whose_job_vanished_while_running_fails_saying_so(
    ray_cluster, platform_settings, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    # Running when the head restarted: the new head's Jobs API knows no job of that id.
    run_id = _recorded(storage, "gone", state=RunState.RUNNING, stage="training")
    settler = _settler(storage, PipelineJobs(platform_settings.jobs_url), grace=3600)
    assert Reconciler(settler).reconcile_once() == []  # within the grace: left alone
    settler.grace_seconds = 0
    (settled,) = Reconciler(settler).reconcile_once()
    assert settled["state"] == "FAILED" and settled["finished"]
    assert f"its job {run_id} is unknown to the cluster" in settled["message"]
    assert "resume the pipeline" in settled["message"]


def test_a_submission_lost_again_and_again_ends_failed(
    ray_cluster, platform_settings, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    run_id = _recorded(storage, "never", stage="resubmitted", resubmits=MAX_RESUBMITS)
    settler = _settler(storage, PipelineJobs(platform_settings.jobs_url))
    (settled,) = Reconciler(settler).reconcile_once()
    assert settled["state"] == "FAILED"
    assert f"lost before it started, {MAX_RESUBMITS} times" in settled["message"]
    assert PipelineJobs(platform_settings.jobs_url).view(run_id) is None  # not submitted


def test_nothing_is_decided_while_the_jobs_api_is_unreachable(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "storage"))
    runs = RunStore(storage)
    run_id = _recorded(storage, "waiting", state=RunState.RUNNING, stage="training")
    before = runs.get(run_id)
    settler = _settler(storage, PipelineJobs("http://127.0.0.1:9"))
    assert Reconciler(settler).reconcile_once() == []
    assert runs.get(run_id) == before


@pytest.fixture(scope="module")
def api(ray_cluster, platform_settings, oidc_provider: OIDCProvider, tmp_path_factory):
    """The pipeline API on loopback with one active pipeline a user and no grace."""
    storage = str(tmp_path_factory.mktemp("reconcile-storage"))
    settings = api_settings(
        platform_settings,
        oidc_provider.issuer,
        storage=storage,
        max_active_pipelines=1,
        reconcile_grace_s=0,
    )
    server = serve_apis(settings, tmp_path_factory.mktemp("apis"))
    yield server, Storage(storage)
    server.stop()


def test_a_lost_run_ends_its_followed_log_and_frees_the_owners_slot(
    api, oidc_provider, shared_data: Path
) -> None:
    server, storage = api
    hzz = str(shared_data / "uproot-HZZ.root")
    token = oidc_provider.token("alice")
    headers = {"Authorization": f"Bearer {token}"}
    owner = httpx.get(f"{server.base_url}/api/v1/whoami", headers=headers).json()["owner"]
    # Running, then the head restarted.
    run_id = _recorded(storage, "vanished", owner, state=RunState.RUNNING, stage="training")

    spec = {"name": "next", "files": [{"path": hzz, "label": 1}], "branch": "no_such_tree"}

    def submit_next() -> httpx.Response:
        return httpx.post(
            f"{server.base_url}/api/v1/pipelines", json={"spec": spec}, headers=headers, timeout=60
        )

    assert submit_next().status_code == 429  # the lost run holds the only active slot
    url = f"{server.base_url}/api/v1/pipelines/{run_id}"
    with httpx.stream(
        "GET", url + "/logs", params={"follow": "true"}, headers=headers, timeout=60
    ) as stream:
        assert stream.status_code == 200
        "".join(stream.iter_text())  # ends: the run is settled while it is followed
    record = httpx.get(url, headers=headers).json()
    assert record["state"] == "FAILED" and "unknown to the cluster" in record["message"]
    # The lost run no longer holds the owner's only active slot: the same submission
    # that was refused for the limit gets to the data checks.
    assert submit_next().status_code == 422
