"""Faults and recovery of the embedded platform: what was lost or stranded, how long back.

One command, on the platform as a user starts it (``mlaas4hep up`` in a private home on
free ports, a token from ``mlaas4hep token``), its storage on a small tmpfs of its own:

* **storage full**: the tmpfs is filled to a few kB below the brim and a model bundle is
  uploaded (``POST /upload``): it must answer 507, leave no half-written file
  (``.tmp-*``, ``.upload-*``, any new hidden file) and no version in the registry;
  once the filler is removed the same upload must succeed;
* **Serve replica killed**: ``hey -z 15s -c 32`` on TFaaS ``/json`` and, 5 s in, one of
  the inference app's ingress replicas is SIGKILLed: the failed requests (non-200 and
  hey's errors) and the time until Serve has as many ingress replicas listening again;
* **training worker killed**: a demo pipeline (one worker, ``max_failures: 1``) has its
  Ray Train worker SIGKILLed after its first checkpoint: Ray Train starts a new worker
  from the checkpoint (the next epoch is the one after the killed one);
* **Ray head killed**: in the same pipeline, after more epochs, a run recorded but never
  submitted is added (its record and spec written as the API writes them, no job: a
  replica dying in between), every process of this head is SIGKILLed (as
  ``mlaas4hep down`` finds them: never another head's), then ``mlaas4hep down`` / ``up``:
  the time from restart until both runs are settled (the running one FAILED as lost,
  the never-submitted one submitted again), whether every run record and registered
  model survived, then the lost run resumed from its checkpoints; both must succeed.

The platform runs with ``MLAAS4HEP_RECONCILE_INTERVAL_S=5`` and
``MLAAS4HEP_RECONCILE_GRACE_S=20`` (defaults 15 and 120 s: recovery then takes up to
that much longer). Prints a table and writes ``benchmarks/results/fault_suite.json`` with
the machine's load. Needs root (``mount -t tmpfs``) and Debian's ``hey``. About 6 minutes::

    python benchmarks/fault_suite.py [--epochs 6] [--storage-mb 128]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from serve_latency import RESULTS, Platform, bodies, hey, machine, tarball, train_bundles

from mlaas4hep.cli.client import PlatformClient
from mlaas4hep.platform.cluster import head_processes
from mlaas4hep.settings import ENV_PREFIX, Settings, load_settings
from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunStore, new_run_id
from mlaas4hep.store.storage import Storage

RECONCILE_ENV = {"MLAAS4HEP_RECONCILE_INTERVAL_S": "5", "MLAAS4HEP_RECONCILE_GRACE_S": "20"}
FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
#: Names of writes in flight: ``.tmp-<uuid>``, ``.upload-<uuid>``, ``.staging-*``, a
#: ledger's ``.<owner>.json.<uuid>``.
IN_FLIGHT = re.compile(r"^\.(tmp-|upload-|staging-|.*[0-9a-f]{32})")
#: Room left on the full storage: less than any bundle needs.
BRIM_BYTES = 8 * 1024


@dataclass
class Outcome:
    """One fault's row of the table."""

    fault: str
    requests_failed: int | str = "-"
    runs_stranded: int | str = "-"
    records_lost: int | str = "-"
    recovery_s: float | str = "-"
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_until(check: Callable[[], Any], timeout: float, poll: float = 0.5) -> tuple[Any, float]:
    """Poll ``check`` until it returns something true; (that value, seconds taken), or
    (None, seconds) after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value, round(time.monotonic() - start, 1)
        time.sleep(poll)
    return None, round(time.monotonic() - start, 1)


class Suite:
    """The platform under test and what every fault needs of it."""

    def __init__(self, work: Path, storage: Path, bundles: dict[str, Path], rows: Any) -> None:
        self.work = work
        self.storage_dir = storage
        self.bundles = bundles
        self.rows = rows
        self.platform = Platform(work / "home")
        self.platform.env.update({"MLAAS4HEP_STORAGE": str(storage), **RECONCILE_ENV})
        self.client: PlatformClient | None = None

    @property
    def settings(self) -> Settings:
        """The platform's settings, as its own processes load them."""
        values = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in self.platform.env.items()
            if key.startswith(ENV_PREFIX)
            and key[len(ENV_PREFIX) :].lower() in Settings.model_fields
        }
        return load_settings(**values)

    @property
    def storage(self) -> Storage:
        return Storage(str(self.storage_dir))

    def up(self) -> float:
        """``mlaas4hep up`` and a token; the seconds it took."""
        start = time.monotonic()
        self.platform.up({})
        if self.client is not None:
            self.client.close()
        self.client = PlatformClient(self.platform.url, self.platform.token, timeout=120)
        return round(time.monotonic() - start, 1)

    def api(self) -> PlatformClient:
        assert self.client is not None, "the platform is not up"
        return self.client

    def upload(self, name: str, bundle: bytes) -> tuple[int, str]:
        """``POST /upload`` of a gzip bundle as ``name``: (status, body)."""
        answer = self.api().http.post(
            "/upload",
            params={"name": name, "visibility": "public"},
            content=bundle,
            headers={"Content-Type": "application/octet-stream"},
            timeout=300,
        )
        return answer.status_code, answer.text[:300]

    def paths(self) -> set[str]:
        """Every file and folder in the storage, relative to it."""
        return {str(path.relative_to(self.storage_dir)) for path in self.storage_dir.rglob("*")}

    def registry(self) -> dict[str, list[int]]:
        """Every registered model with its published versions, from the storage."""
        registry = ModelRegistry(self.storage)
        return {r.name: registry.versions(r.name) for r in registry.list_records()}

    def runs(self) -> dict[str, str]:
        """Every run record in the storage: id -> state."""
        return {r["id"]: r["state"] for r in RunStore(self.storage).list()}


# --------------------------------------------------------------------------- faults


def storage_full(suite: Suite) -> Outcome:
    """A bundle upload into a storage a few kB from full: 507, nothing half-written, and
    the same upload succeeds once there is room."""
    out = Outcome("storage full during a registration (POST /upload)")
    name = "dense-savedmodel"  # as its params.json names it
    bundle = tarball(suite.bundles[name])
    before = suite.registry()
    filler = suite.storage_dir / "filler"
    stat = os.statvfs(suite.storage_dir)
    room = stat.f_bavail * stat.f_frsize - BRIM_BYTES
    with filler.open("wb") as stream:
        while room > 0:
            room -= stream.write(b"\0" * min(room, 1 << 20))
    paths = suite.paths()
    status, text = suite.upload(name, bundle)
    new = sorted(suite.paths() - paths)
    leftovers = [p for p in new if IN_FLIGHT.match(Path(p).name)]
    during = suite.registry()
    start = time.monotonic()
    filler.unlink()
    retry, retry_text = suite.upload(name, bundle)
    after = suite.registry()
    out.recovery_s = round(time.monotonic() - start, 1)
    lost = sum(len(set(v) - set(after.get(k, []))) for k, v in before.items())
    out.records_lost = lost
    out.runs_stranded = 0
    out.requests_failed = int(status != 507) + int(retry != 200)  # answers not as expected
    out.notes.append(f"full: {status} (expected 507), half-written files left {len(leftovers)}")
    out.notes.append(
        f"versions while full {during.get(name, [])}; after freeing {retry}, "
        f"versions {after.get(name, [])}"
    )
    out.details = {
        "bundle_bytes": len(bundle),
        "full_answer": [status, text],
        "new_paths_while_full": new,
        "leftover_files": leftovers,
        "versions_while_full": during.get(name, []),
        "retry_answer": [retry, retry_text],
        "versions_after": after.get(name, []),
    }
    return out


def replica_killed(suite: Suite, seconds: int, concurrency: int, kill_at: float) -> Outcome:
    """``hey`` on ``/json`` with one ingress replica SIGKILLed ``kill_at`` s into the load."""
    out = Outcome(f"TFaaS ingress replica SIGKILLed {kill_at:g} s into hey -c {concurrency}")
    model = "dense-keras"
    status, text = suite.upload(model, tarball(suite.bundles[model]))
    if status != 200:
        raise RuntimeError(f"upload of {model}: {status} {text}")
    body = suite.work / "json-body.json"
    body.write_bytes(bodies(suite.rows)[(model, "json")])
    url, token = f"{suite.platform.url}/json", suite.platform.token
    warm = hey(url, body, token, "-n", "400", "-c", "8")
    replicas = suite.platform.ingress_pids()
    figures: dict[str, Any] = {}
    load = threading.Thread(
        target=lambda: figures.update(
            hey(url, body, token, "-z", f"{seconds}s", "-c", str(concurrency))
        )
    )
    load.start()
    time.sleep(kill_at)
    victim = replicas[0]
    os.kill(victim, signal.SIGKILL)

    def back() -> bool:
        now = suite.platform.ingress_pids()
        return victim not in now and len(now) >= len(replicas)

    returned, out.recovery_s = wait_until(back, timeout=180, poll=0.2)
    load.join()
    out.requests_failed = figures.get("non_200", 0) + figures.get("errors", 0)
    out.runs_stranded = out.records_lost = 0
    if not returned:
        out.notes.append(f"replica not back after {out.recovery_s} s")
    out.notes.append(
        f"{figures.get('requests')} requests, {figures.get('rps')} req/s, "
        f"p99 {figures.get('p99_ms')} ms; {len(replicas)} replicas"
    )
    out.details = {"warm_up": warm, "load": figures, "replicas": replicas, "killed": victim}
    return out


def demo_spec(folder: Path, epochs: int) -> Path:
    """The demo pipeline, one training worker that may fail once, slow enough epochs."""
    from mlaas4hep.cli.quickstart import write_demo_inputs

    path = write_demo_inputs(folder, events=1500, epochs=epochs)
    spec = yaml.safe_load(path.read_text())
    spec.update(name="fault-demo", batch_size=32)
    spec["resources"] = {"num_workers": 1, "max_failures": 1}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def epoch_of(record: dict[str, Any]) -> int:
    return int((record.get("progress") or {}).get("epoch") or 0)


def wait_epoch(client: PlatformClient, run_id: str, epoch: int, timeout: float) -> dict[str, Any]:
    """The run's record once it reports ``epoch`` (RuntimeError when it ends before)."""

    def reached() -> dict[str, Any] | None:
        record = client.pipeline(run_id)
        if record["state"] in FINISHED:
            raise RuntimeError(f"run {run_id} ended before epoch {epoch}: {record}")
        return record if epoch_of(record) >= epoch else None

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        found = reached()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not reach epoch {epoch} in {timeout:.0f} s")


def train_workers(suite: Suite) -> list[psutil.Process]:
    """The Ray Train workers among this head's processes."""
    found = []
    for proc in head_processes(suite.settings):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def worker_killed(suite: Suite, run_id: str) -> Outcome:
    """SIGKILL the run's training worker after its first checkpoint; the time until the
    next epoch is reported, and which epoch that is (the one after the killed one when
    training went on from the checkpoint)."""
    out = Outcome("training worker SIGKILLed (Ray Train max_failures 1)")
    client = suite.api()
    wait_epoch(client, run_id, 1, timeout=300)
    workers = train_workers(suite)
    if not workers:
        raise RuntimeError("no Ray Train worker found among the head's processes")
    for proc in workers:
        proc.kill()
    start = time.monotonic()
    killed_at = epoch_of(client.pipeline(run_id))
    record = wait_epoch(client, run_id, killed_at + 1, timeout=300)
    out.recovery_s = round(time.monotonic() - start, 1)
    out.requests_failed = out.records_lost = out.runs_stranded = 0
    out.notes.append(f"killed after epoch {killed_at}, next epoch {epoch_of(record)}")
    out.details = {
        "killed_pids": [p.pid for p in workers],
        "killed_after_epoch": killed_at,
        "next_epoch": epoch_of(record),
        "state": record["state"],
    }
    return out


def record_unsubmitted(suite: Suite, template: dict[str, Any]) -> str:
    """A run recorded as the API records one, whose job is never submitted: the files
    and spec the API wrote for ``template``'s run, as its own, then a record of the same
    owner and limits."""
    run_id = new_run_id()
    source, target = f"runs/{template['id']}/", f"runs/{run_id}/"
    spec = suite.storage.read_text("runs", template["id"], "spec.json")
    folder = suite.storage_dir / "runs"
    for entry in suite.storage.listdir("runs", template["id"]):
        if source + entry in spec:  # the inputs and model file the spec reads
            copy = shutil.copytree if (folder / template["id"] / entry).is_dir() else shutil.copy
            (folder / run_id).mkdir(exist_ok=True)
            copy(folder / template["id"] / entry, folder / run_id / entry)
    suite.storage.write_text(spec.replace(source, target), "runs", run_id, "spec.json")
    keep = {k: template[k] for k in ("quota_bytes",) if k in template}
    RunStore(suite.storage).create(
        run_id, owner=template["owner"], name=template["name"], job_id=run_id, **keep
    )
    return run_id


def head_killed(suite: Suite, run_id: str, after_epoch: int) -> Outcome:
    """SIGKILL the head during the run, ``mlaas4hep down``/``up``; settle, resume, finish."""
    out = Outcome("Ray head SIGKILLed during a pipeline, then down/up")
    client = suite.api()
    record = wait_epoch(client, run_id, after_epoch, timeout=300)
    lost_submit = record_unsubmitted(suite, client.pipeline(run_id))
    runs_before, models_before = suite.runs(), suite.registry()
    procs = head_processes(suite.settings)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)
    killed_epoch = epoch_of(record)
    survivors = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(run_id in arg for arg in p.info.get("cmdline") or [])
    ]
    suite.platform.cli("down")
    start = time.monotonic()
    up_s = suite.up()
    client = suite.api()

    def settled() -> dict[str, dict[str, Any]] | None:
        lost, pending = client.pipeline(run_id), client.pipeline(lost_submit)
        if lost["state"] in FINISHED and pending.get("stage") != "submitted":
            return {"lost": lost, "unsubmitted": pending}
        return None

    found, _ = wait_until(settled, timeout=240, poll=1.0)
    settle_s = round(time.monotonic() - start, 1)
    runs_after, models_after = suite.runs(), suite.registry()
    lost_records = [r for r in runs_before if r not in runs_after]
    lost_versions = [
        f"{k} v{v}"
        for k, vs in models_before.items()
        for v in vs
        if v not in models_after.get(k, [])
    ]
    resumed = client.resume(run_id) if found and found["lost"]["state"] == "FAILED" else None
    ends = {}
    for rid in (run_id, lost_submit):
        with contextlib.suppress(Exception):
            ends[rid] = client.wait(rid, poll=2, timeout=400)
    finish_s = round(time.monotonic() - start, 1)
    log = ""
    with contextlib.suppress(Exception):
        log = client.logs(run_id)
    stranded = [
        rid for rid in (run_id, lost_submit) if ends.get(rid, {}).get("state") != "SUCCEEDED"
    ]
    out.requests_failed = 0
    out.runs_stranded = len(stranded)
    out.records_lost = len(lost_records) + len(lost_versions)
    out.recovery_s = settle_s
    settled_run = (found or {}).get("lost", {})
    out.notes.append(f"up {up_s} s; both runs settled {settle_s} s after restart")
    kept = epoch_of(settled_run)
    from_checkpoint = "resuming after epoch" in log
    out.notes.append(
        f"killed after epoch {killed_epoch}, record kept epoch {kept}, resumed "
        f"{'from its checkpoint' if from_checkpoint else 'WITHOUT a checkpoint in its log'}"
    )
    out.notes.append(
        f"lost run {settled_run.get('state', '?')} -> resumed -> "
        f"{ends.get(run_id, {}).get('state', '?')}; unsubmitted run "
        f"{(found or {}).get('unsubmitted', {}).get('stage', '?')} -> "
        f"{ends.get(lost_submit, {}).get('state', '?')}; both done {finish_s} s after restart"
    )
    if survivors:
        out.notes.append(f"processes of the run outlived the kill: {survivors}")
    out.details = {
        "killed_processes": len(procs),
        "killed_after_epoch": killed_epoch,
        "record_kept_epoch": kept,
        "resumed_from_checkpoint": from_checkpoint,
        "survivors": survivors,
        "up_s": up_s,
        "settle_s": settle_s,
        "finish_s": finish_s,
        "settled": found,
        "resumed": resumed,
        "ends": ends,
        "lost_records": lost_records,
        "lost_versions": lost_versions,
        "runs_before": runs_before,
        "models_before": models_before,
        "models_after": models_after,
    }
    return out


# --------------------------------------------------------------------------- main


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| fault | requests failed | runs stranded | records lost | recovery s | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.fault} | {o.requests_failed} | {o.runs_stranded} | {o.records_lost} | "
            f"{o.recovery_s} | {'; '.join(o.notes)} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def tmpfs(folder: Path, megabytes: int):
    """A tmpfs of ``megabytes`` mounted on ``folder`` for the block, unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def run_faults(suite: Suite, args: argparse.Namespace) -> list[Outcome]:
    """Every fault in turn on one platform; a fault that raises is reported as such."""
    outcomes: list[Outcome] = []

    def attempt(name: str, fault: Callable[[], Outcome]) -> None:
        before = load1()
        try:
            outcome = fault()
        except Exception as error:  # the suite goes on and reports it
            outcome = Outcome(name, notes=[f"did not complete: {type(error).__name__}: {error}"])
        outcome.load_average = [before, load1()]
        outcomes.append(outcome)
        print(f"{outcome.fault}: {outcome.notes}", flush=True)

    attempt("storage full", lambda: storage_full(suite))
    attempt("replica killed", lambda: replica_killed(suite, args.seconds, args.concurrency, 5.0))
    spec = demo_spec(suite.work / "demo", args.epochs)
    from mlaas4hep.spec import load_spec

    run_id = suite.api().submit(load_spec(spec))["id"]
    attempt("worker killed", lambda: worker_killed(suite, run_id))
    after = next((o.details.get("next_epoch", 1) for o in outcomes[-1:]), 1) + 1
    attempt("head killed", lambda: head_killed(suite, run_id, after))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="of the pipeline")
    parser.add_argument("--seconds", type=int, default=15, help="of the load")
    parser.add_argument("--concurrency", type=int, default=32, help="hey -c")
    parser.add_argument("--storage-mb", type=int, default=128, help="size of the tmpfs")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("hey is not installed (Debian package 'hey'; scripts/install-system-packages.sh)")
        return 2
    if os.geteuid() != 0:
        print("the storage fault mounts a tmpfs: run as root")
        return 2
    RESULTS.mkdir(exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mlaas4hep-faults-"))
    try:
        with tmpfs(work / "storage", args.storage_mb) as storage:
            bundles, rows = train_bundles(work / "bundles", events=1000)
            suite = Suite(work, storage, bundles, rows)
            try:
                suite.up()
                outcomes = run_faults(suite, args)
            finally:
                with contextlib.suppress(Exception):
                    suite.platform.down()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(outcomes))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine(load_start),
        "settings": RECONCILE_ENV,
        "seconds": round(time.time() - started),
        "faults": [asdict(o) for o in outcomes],
    }
    (RESULTS / "fault_suite.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {RESULTS / 'fault_suite.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
