"""Settling run records with what the cluster says of their jobs.

A run's record (:mod:`mlaas4hep.store.runs`) and its Ray Job (:mod:`~mlaas4hep.platform.
jobs`, or a KubeRay RayJob) can drift apart: the job ends without the pipeline writing its
end (killed driver, RayJob), the Ray head restarts and forgets every job, or an API
replica dies between recording a submission and submitting its job. Such a run would
stay pending or running forever, count toward its owner's active limit and keep
``logs?follow=true`` open.

:func:`settle_run` brings one record in line with its job; :class:`Reconciler` does it for
every unfinished run, at start and then every ``interval`` seconds, in a thread of each
pipeline API replica. Every change is a compare-and-set on the run's state
(``RunStore.update(only_if=...)``), so replicas reconciling at once, or a job writing its
own end meanwhile, never overwrite each other.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Any

from mlaas4hep.pipeline.jobs import JobsUnavailable, PipelineJobs
from mlaas4hep.pipeline.rayjob import register_staged_bundle
from mlaas4hep.store.runs import RunState, RunStateConflict, RunStore, now_iso
from mlaas4hep.store.storage import Storage

logger = logging.getLogger(__name__)

#: Stages of a pending record whose job never started (submission or resume accepted).
NOT_STARTED_STAGES = frozenset({"submitted", "resuming", "resubmitted"})
#: A lost submission is submitted again at most this many times, then the run fails.
MAX_RESUBMITS = 3


@dataclass
class RunSettler:
    """What :func:`settle_run` needs: the run records, the jobs and the storage."""

    storage: Storage
    runs: RunStore
    jobs: PipelineJobs
    #: How long a pending record may wait for its job to appear (a submission may be on
    #: its way: a head that has just started takes up to a minute to accept jobs).
    grace_seconds: float = 120.0


def _age_seconds(record: dict[str, Any]) -> float:
    """Seconds since the record was last updated (its creation when never)."""
    stamp = record.get("updated") or record.get("created") or ""
    try:
        then = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return float("inf")
    return (dt.datetime.now(dt.UTC) - then).total_seconds()


def _job_id(record: dict[str, Any]) -> str:
    return record.get("job_id") or record["id"]


def settle_run(settler: RunSettler, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` brought in line with its job; returns the (possibly updated) record.

    * the job ended (failed, stopped) and the record did not: the record takes its end;
    * a succeeded RayJob: its staged bundle is registered (FAILED when it staged none);
    * the cluster does not know the job: a run that never started is submitted again
      after ``grace_seconds`` (at most :data:`MAX_RESUBMITS` times); a run that had started
      is FAILED with a message saying its job was lost (it may be resumed).

    Raises :class:`~mlaas4hep.pipeline.jobs.JobsUnavailable` when the Jobs API cannot be
    reached: nothing is decided about a run while its cluster is down.
    """
    state = RunState(record["state"])
    if state.finished:
        return record
    job = settler.jobs.view(_job_id(record))
    try:
        if job is None:
            return _lost_job(settler, record, state)
        if job.state in {"FAILED", "CANCELLED"}:
            message = record.get("message") or job.message
            return settler.runs.update(
                record["id"], only_if={state}, state=job.state, message=message
            )
        if job.state == "SUCCEEDED" and state != RunState.SUCCEEDED:
            # A RayJob stages its bundle in the run's folder; the API registers it.
            found = register_staged_bundle(settler.storage, settler.runs, record["id"], job)
            return found or settler.runs.update(
                record["id"],
                only_if={state},
                state=RunState.FAILED,
                message="the job ended without registering a model",
            )
    except RunStateConflict:
        return settler.runs.get(record["id"])  # changed meanwhile: the newer record stands
    return record


def _lost_job(settler: RunSettler, record: dict[str, Any], state: RunState) -> dict[str, Any]:
    """Settle a run whose job the cluster does not know."""
    run_id, job_id = record["id"], _job_id(record)
    if _age_seconds(record) < settler.grace_seconds:
        return record
    never_started = state == RunState.PENDING and record.get("stage") in NOT_STARTED_STAGES
    resubmits = int(record.get("resubmits") or 0)
    if never_started and resubmits < MAX_RESUBMITS:
        record = settler.runs.update(
            run_id, only_if={state}, stage="resubmitted", resubmits=resubmits + 1
        )
        try:
            settler.jobs.submit(
                run_id, record["owner"], settler.runs.spec_uri(run_id), job_id=job_id
            )
        except Exception as error:  # the cluster refused it: the next round tries again
            logger.warning(
                "run %s: submitting its lost job %s again failed: %s", run_id, job_id, error
            )
            return record
        logger.warning("run %s: its job %s was never started; submitted again", run_id, job_id)
        return record
    if never_started:
        message = (
            f"its job {job_id} was lost before it started, {resubmits} times: the cluster "
            "did not keep the submission"
        )
    else:
        message = (
            f"its job {job_id} is unknown to the cluster (the Ray head restarted or the "
            "job was lost while it ran); resume the pipeline to continue from its last "
            "checkpoint"
        )
    logger.warning("run %s: %s", run_id, message)
    return settler.runs.update(
        run_id, only_if={state}, state=RunState.FAILED, message=message, finished=now_iso()
    )


class Reconciler:
    """Settles every unfinished run at start and every ``interval`` seconds, in a thread."""

    def __init__(self, settler: RunSettler, interval: float = 15.0) -> None:
        self.settler = settler
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reconcile_once(self) -> list[dict[str, Any]]:
        """Settle each unfinished run; return the records that changed state or stage."""
        changed = []
        for record in self.settler.runs.list():
            if RunState(record["state"]).finished:
                continue
            try:
                settled = settle_run(self.settler, record)
            except JobsUnavailable as error:
                logger.info("runs not reconciled: %s", error)
                return changed
            except Exception:  # one bad record must not stop the others
                logger.exception("run %s: cannot reconcile", record.get("id"))
                continue
            if (settled["state"], settled.get("stage")) != (record["state"], record.get("stage")):
                changed.append(settled)
        return changed

    def start(self) -> None:
        """Reconcile now and then every ``interval`` seconds until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="run-reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception:
                logger.exception("reconciling runs failed")
            self._stop.wait(self.interval)
