"""The platform's state stays consistent under concurrent writers, full disks and bad input.

Run records, registry versions and the owner of a model name are changed in one step
under a lock file; several real processes (``multiprocessing``, spawned) write to one
storage folder at once. A full disk is a real one for the test process: its file size
limit (``RLIMIT_FSIZE``) makes the kernel refuse writes past a few kilobytes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_fixtures import LocalApis
from state_workers import (
    metric_updates,
    progress_updates,
    register,
    write_test_bundle,
)

from mlaas4hep.store.registry import ModelNameTaken, ModelRegistry
from mlaas4hep.store.runs import RunState, RunStateConflict, RunStore, new_run_id
from mlaas4hep.store.storage import LockTimeout, Storage, StorageFull

SPAWN = multiprocessing.get_context("spawn")
#: Bytes a file of the test process may grow to while the disk is "full".
FULL_AT = 16_384


def start_all(target, arguments: list[tuple]) -> None:
    """Run ``target`` in one spawned process per tuple of ``arguments`` (each ends with
    a shared barrier), all let go at once; fail on any process that fails."""
    barrier = SPAWN.Barrier(len(arguments))
    processes = [SPAWN.Process(target=target, args=(*args, barrier)) for args in arguments]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def hidden_leftovers(root: Path) -> list[str]:
    """Temporary files and folders (``.tmp-*``, ``.upload-*``) anywhere below ``root``."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if p.name.startswith((".tmp-", ".upload-", ".staging-"))
    )


@contextlib.contextmanager
def full_disk(limit: int = FULL_AT) -> Iterator[None]:
    """Writes of this process past ``limit`` bytes of a file fail (EFBIG) meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# --------------------------------------------------------------------------- run records


def test_a_cancel_is_kept_while_the_job_goes_on_updating_its_progress(tmp_path):
    storage = Storage(str(tmp_path))
    runs = RunStore(storage)
    run_ids = sorted({new_run_id() for _ in range(6)})
    for run_id in run_ids:
        runs.create(run_id, owner="alice", name="m", state=RunState.RUNNING.value)
    barrier = SPAWN.Barrier(2)
    job = SPAWN.Process(target=progress_updates, args=(str(tmp_path), run_ids, 40, barrier))
    job.start()
    barrier.wait()
    for run_id in run_ids:  # each cancelled while the job writes, as the API does
        while not runs.get(run_id)["progress"]:
            time.sleep(0.001)
        runs.update(run_id, state=RunState.CANCELLED, message="cancelled by the user")
    job.join(timeout=120)
    assert job.exitcode == 0
    records = [runs.get(run_id) for run_id in run_ids]
    assert [r["state"] for r in records] == ["CANCELLED"] * len(run_ids)
    assert {r["message"] for r in records} == {"cancelled by the user"}
    assert [r["progress"] for r in records] == [{"epoch": 39}] * len(run_ids)


def test_a_job_that_starts_or_fails_after_a_cancel_leaves_the_run_cancelled(tmp_path):
    runs = RunStore(Storage(str(tmp_path)))
    run_id = new_run_id()
    runs.create(run_id, owner="alice", name="m")
    runs.update(run_id, state=RunState.CANCELLED, message="cancelled by the user")
    runs.update(run_id, state=RunState.RUNNING, stage="checking inputs", message="")
    record = runs.update(run_id, state=RunState.FAILED, message="KeyboardInterrupt", finished="t")
    assert (record["state"], record["message"], record["finished"]) == (
        "CANCELLED",
        "cancelled by the user",
        "t",
    )
    assert runs.get(run_id) == record


def test_updates_from_several_processes_at_once_lose_nothing(tmp_path):
    runs = RunStore(Storage(str(tmp_path)))
    run_id = new_run_id()
    runs.create(run_id, owner="alice", name="m")
    writers = ["a", "b", "c"]
    start_all(metric_updates, [(str(tmp_path), run_id, w, 40) for w in writers])
    metrics = runs.get(run_id)["metrics"]
    assert sorted(metrics) == sorted(f"{w}-{i}" for w in writers for i in range(40))
    assert os.listdir(tmp_path / "runs" / run_id) == ["status.json"]  # no lock file left


def test_a_finished_run_changes_state_only_from_the_state_the_caller_expects(tmp_path):
    runs = RunStore(Storage(str(tmp_path)))
    run_id = new_run_id()
    runs.create(run_id, owner="alice", name="m", state=RunState.FAILED.value)
    resumed = runs.update(run_id, only_if={RunState.FAILED}, state=RunState.PENDING, resumes=1)
    assert resumed["state"] == "PENDING"
    with pytest.raises(RunStateConflict, match="is pending"):  # a second resume at once
        runs.update(run_id, only_if={RunState.FAILED}, state=RunState.PENDING, resumes=2)
    assert runs.get(run_id)["resumes"] == 1


# --------------------------------------------------------------------------- locks


def test_a_lock_abandoned_by_a_crashed_writer_is_broken_after_its_expiry(tmp_path):
    storage = Storage(str(tmp_path))
    (tmp_path / ".lock").write_bytes(b"someone")
    with (
        pytest.raises(LockTimeout, match="held by another writer"),
        storage.lock(".lock", timeout=0.2, expiry=60),
    ):
        pass
    old = time.time() - 120
    os.utime(tmp_path / ".lock", (old, old))
    with storage.lock(".lock", timeout=0.2, expiry=60):
        assert (tmp_path / ".lock").read_bytes() != b"someone"
    assert not (tmp_path / ".lock").exists()


def test_a_lock_on_an_object_store_lets_one_writer_in_at_a_time():
    storage = Storage(f"memory://locks-{new_run_id()}")
    storage.write_json(0, "counter.json")

    def add() -> None:
        for _ in range(25):
            with storage.lock("counter.lock"):
                value = storage.read_json("counter.json")
                time.sleep(0.0005)
                storage.write_json(value + 1, "counter.json")

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.read_json("counter.json") == 100
    assert not storage.exists("counter.lock")


# --------------------------------------------------------------------------- registry


def test_registrations_of_one_name_from_several_processes_get_distinct_complete_versions(
    tmp_path,
):
    root = tmp_path / "storage"
    writers = [f"w{i}" for i in range(4)]
    bundles = {w: write_test_bundle(tmp_path / w, "shared", w) for w in writers}
    out = SPAWN.Queue()
    start_all(register, [(str(root), "shared", str(bundles[w]), "alice", out) for w in writers])
    versions = sorted(out.get(timeout=10)[1] for _ in writers)
    assert versions == [1, 2, 3, 4]
    registry = ModelRegistry(Storage(str(root)))
    assert registry.versions("shared") == [1, 2, 3, 4]
    seen = set()
    for version in versions:
        folder = root / "models" / "shared" / str(version)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert files == ["metadata.json", "params.json", "saved_model", "saved_model/payload.bin"]
        writer = json.loads((folder / "params.json").read_text())["writer"]
        payload = (folder / "saved_model" / "payload.bin").read_bytes()
        assert payload == writer.encode() * 200_000  # whole, and of the same writer
        seen.add(writer)
    assert seen == set(writers)
    assert hidden_leftovers(root) == []


def test_two_owners_registering_one_new_name_at_once_leave_it_to_one_of_them(tmp_path):
    root = tmp_path / "storage"
    owners = ["alice", "bob"]
    bundles = {o: write_test_bundle(tmp_path / o, "contested", o) for o in owners}
    for round_ in range(3):
        name = f"contested-{round_}"
        out = SPAWN.Queue()
        start_all(register, [(str(root), name, str(bundles[o]), o, out) for o in owners])
        answers = dict(out.get(timeout=10) for _ in owners)
        winners = [o for o, answer in answers.items() if answer != "taken"]
        assert len(winners) == 1 and answers[winners[0]] == 1, answers
        record = ModelRegistry(Storage(str(root))).record(name)
        assert (record.owner, record.versions) == (winners[0], [1])
        metadata = json.loads((root / "models" / name / "1" / "metadata.json").read_text())
        assert metadata["owner"] == winners[0]


def test_a_new_version_keeps_the_visibility_of_the_model(tmp_path):
    registry = ModelRegistry(Storage(str(tmp_path / "storage")))
    bundle = write_test_bundle(tmp_path / "b", "shown", "alice")
    registry.register("shown", bundle, "alice", "group", ["/cms"])
    registry.register("shown", bundle, "alice")
    record = registry.record("shown")
    assert (record.visibility, record.groups, record.versions) == ("group", ["/cms"], [1, 2])
    registry.register("shown", bundle, "alice", "private")
    assert registry.record("shown").visibility == "private"


def test_on_an_object_store_a_version_counts_once_its_params_json_is_there(tmp_path):
    storage = Storage(f"memory://registry-{new_run_id()}")
    registry = ModelRegistry(storage)
    bundle = write_test_bundle(tmp_path / "b", "remote", "alice")
    assert registry.register("remote", bundle, "alice").version == 1
    storage.write_bytes(b"half a copy", "models", "remote", "2", "saved_model", "x.bin")
    assert registry.versions("remote") == [1]
    assert registry.register("remote", bundle, "alice").version == 3  # 2 is being copied
    assert registry.versions("remote") == [1, 3]


def test_on_an_object_store_a_staged_bundle_is_registered_by_one_of_its_claimants(tmp_path):
    from mlaas4hep.pipeline.jobs import JobView
    from mlaas4hep.pipeline.rayjob import register_staged_bundle

    owner = "alice-0123456789"  # an owner id as the issuer makes them
    storage = Storage(f"memory://staged-{new_run_id()}")
    runs = RunStore(storage)
    run_id = new_run_id()
    runs.create(run_id, owner=owner, name="staged", job_id=run_id)
    storage.upload_dir(write_test_bundle(tmp_path / "b", "staged", "job"), "runs", run_id, "bundle")
    job = JobView(run_id, "SUCCEEDED", "", {"owner": owner, "model": "staged", "run_id": run_id})
    # Two replicas see the job succeed at once: each registers unless the other claimed it.
    answers: list = []
    claimants = [
        threading.Thread(
            target=lambda: answers.append(register_staged_bundle(storage, runs, run_id, job))
        )
        for _ in range(2)
    ]
    for thread in claimants:
        thread.start()
    for thread in claimants:
        thread.join()
    assert ModelRegistry(storage).versions("staged") == [1]
    assert runs.get(run_id)["state"] == "SUCCEEDED"
    assert not storage.exists("runs", run_id, "bundle")
    assert register_staged_bundle(storage, runs, run_id, job) is None  # seen again later


def test_a_registration_the_disk_cannot_hold_leaves_nothing_and_the_retry_gets_its_number(
    tmp_path,
):
    root = tmp_path / "storage"
    registry = ModelRegistry(Storage(str(root)))
    bundle = write_test_bundle(tmp_path / "b", "big", "alice")
    registry.register("big", write_test_bundle(tmp_path / "small", "big", "a"), "alice")
    (bundle / "saved_model" / "payload.bin").write_bytes(b"x" * (FULL_AT * 4))
    with full_disk(), pytest.raises(StorageFull, match="models/big/2: copy failed"):
        registry.register("big", bundle, "alice")
    assert registry.versions("big") == [1]
    assert hidden_leftovers(root) == []
    assert registry.register("big", bundle, "alice").version == 2


# --------------------------------------------------------------------------- full disk


def test_a_write_the_disk_cannot_hold_leaves_no_temporary_file(tmp_path):
    storage = Storage(str(tmp_path))
    with full_disk(), pytest.raises(StorageFull, match=r"runs/r/spec\.json: write failed"):
        storage.write_bytes(b"x" * (FULL_AT * 4), "runs", "r", "spec.json")
    assert hidden_leftovers(tmp_path) == []
    assert not storage.exists("runs", "r", "spec.json")


def test_an_upload_the_disk_cannot_hold_is_answered_507_and_leaves_nothing(
    local_apis: LocalApis,
):
    with full_disk():
        answer = local_apis.call("dora", "PUT", "/api/v1/files/big.bin", content=b"y" * 60_000)
    assert answer.status_code == 507, answer.text
    assert answer.json() == {"error": "the platform's storage has no room for this request"}
    listing = local_apis.call("dora", "GET", "/api/v1/files").json()
    assert (listing["files"], listing["used_bytes"]) == ([], 0)
    assert hidden_leftovers(Path(local_apis.storage.root)) == []


# --------------------------------------------------------------------------- submissions


def demo_spec(folder: Path, name: str) -> dict:
    from mlaas4hep.cli.demo import write_demo_data

    signal_file, background = write_demo_data(folder, events=200, seed=3)
    files = [{"path": str(signal_file), "label": 1}, {"path": str(background), "label": 0}]
    return {"name": name, "files": files, "branch": "Events"}


def test_a_model_name_is_reserved_for_its_submitter_at_submission(local_apis: LocalApis, tmp_path):
    body = {"spec": demo_spec(tmp_path, "held-name")}
    first = local_apis.call("erin", "POST", "/api/v1/pipelines", json=body)
    # Every check passed; no cluster runs the job here, but the name is erin's already.
    assert first.status_code == 503, first.text
    assert first.json()["error"].startswith("the cluster did not accept the pipeline")
    runs_before = local_apis.storage.listdir("runs")
    refused = local_apis.call("fred", "POST", "/api/v1/pipelines", json=body)
    assert refused.status_code == 409
    assert refused.json() == {
        "error": "spec.name: model name 'held-name' belongs to another user; choose another"
    }
    assert local_apis.storage.listdir("runs") == runs_before  # refused before any record
    registry = ModelRegistry(local_apis.storage)
    bundle = write_test_bundle(tmp_path / "bundle", "held-name", "fred")
    with pytest.raises(ModelNameTaken):  # a TFaaS upload under the name: the same refusal
        registry.register("held-name", bundle, local_apis.owner("fred"))
    again = local_apis.call("erin", "POST", "/api/v1/pipelines", json=body)
    assert again.status_code == 503, again.text  # the submitter keeps the name
    assert registry.register("held-name", bundle, local_apis.owner("erin")).version == 1
    unnamed = {"spec": {k: v for k, v in body["spec"].items() if k != "name"}}
    assert local_apis.call("erin", "POST", "/api/v1/pipelines", json=unnamed).status_code == 503
    refused = local_apis.call("fred", "POST", "/api/v1/pipelines", json=unnamed)
    assert refused.status_code == 409
    assert refused.json() == {
        "error": "spec.name: model name 'model' (the default: the spec names none) belongs "
        "to another user; choose another"
    }


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("filename", ["..", "", ".", "dir/..", "/", ".hidden.py"])
def test_a_model_filename_that_names_no_file_is_refused_with_422(
    local_apis: LocalApis, filename: str
):
    body = {"spec": {"name": "x"}, "model_source": "def model(idim):\n    pass\n"}
    body["model_filename"] = filename
    answer = local_apis.call("gina", "POST", "/api/v1/pipelines", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith("invalid request: model_filename:")


def test_the_files_root_is_no_file_to_read_or_delete(local_apis: LocalApis):
    put = local_apis.call("hana", "PUT", "/api/v1/files/keep/me.txt", content=b"kept")
    assert put.status_code == 201, put.text
    for method in ("GET", "DELETE"):
        answer = local_apis.call("hana", method, "/api/v1/files/")
        assert answer.status_code == 400, answer.text
        assert answer.json() == {"error": "file path is empty"}
    folder = local_apis.call("hana", "GET", "/api/v1/files/keep")
    assert folder.status_code == 400
    assert folder.json() == {"error": "'keep' is a folder: list it with GET /files"}
    over = local_apis.call("hana", "PUT", "/api/v1/files/keep", content=b"x")
    assert over.status_code == 409, over.text
    under = local_apis.call("hana", "PUT", "/api/v1/files/keep/me.txt/x", content=b"x")
    assert under.status_code == 409, under.text
    assert local_apis.call("hana", "GET", "/api/v1/files/keep/me.txt").content == b"kept"
