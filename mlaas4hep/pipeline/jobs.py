"""Pipelines as Ray Jobs: submit, inspect, stop, through Ray's Jobs API behind its token.

Each pipeline is one Ray Job whose submission id is the run id and whose metadata
names the owner and the run, so ``ray job list`` and the dashboard show who runs what.
The entrypoint is built from fixed words plus the run id (made by the platform), never
from user input. On Kubernetes :mod:`mlaas4hep.pipeline.rayjob` runs one KubeRay RayJob
per pipeline instead; its :func:`~mlaas4hep.pipeline.rayjob.pipeline_jobs` picks the backend.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from mlaas4hep.auth.ray_token import ray_token
from mlaas4hep.store.runs import check_run_id

#: How long a submission waits for a freshly started head's job agent.
AGENT_WAIT_SECONDS = 60.0

#: Ray job states mapped to run states.
JOB_TO_RUN_STATE = {
    JobStatus.PENDING: "PENDING",
    JobStatus.RUNNING: "RUNNING",
    JobStatus.SUCCEEDED: "SUCCEEDED",
    JobStatus.FAILED: "FAILED",
    JobStatus.STOPPED: "CANCELLED",
}


class JobsUnavailable(ConnectionError):
    """The Jobs API cannot be reached or answers errors (the head is down or restarting);
    the HTTP APIs answer it with 503."""


@dataclass(frozen=True)
class JobView:
    """What the Jobs API says of one pipeline's job."""

    job_id: str
    state: str
    message: str
    metadata: dict[str, str]


def pipeline_entrypoint(spec_uri: str, run_id: str, owner: str) -> str:
    """Shell command of the Ray Job that runs one pipeline."""
    check_run_id(run_id)
    words = [sys.executable, "-m", "mlaas4hep.cli.main", "run", spec_uri, "--run-id", run_id]
    words += ["--owner", owner]
    return shlex.join(words)


class PipelineJobs:
    """Thin client of Ray's Jobs API for pipeline runs."""

    def __init__(self, jobs_url: str) -> None:
        self.jobs_url = jobs_url
        self._client: JobSubmissionClient | None = None

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {ray_token()}"}
            self._client = JobSubmissionClient(self.jobs_url, headers=headers)
        return self._client

    def submit(
        self,
        run_id: str,
        owner: str,
        spec_uri: str,
        entrypoint_resources: dict[str, float] | None = None,
        env_vars: dict[str, str] | None = None,
        job_id: str | None = None,
        entrypoint: str | None = None,
    ) -> str:
        """Start the pipeline's Ray Job; return its job id (``job_id``, default the run id).

        A resumed run needs a new ``job_id``: Ray never reuses a submission id.
        ``entrypoint`` replaces the pipeline's command (another platform-made command).
        """
        runtime_env: dict[str, Any] = {"env_vars": {"TF_USE_LEGACY_KERAS": "1", **(env_vars or {})}}
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=entrypoint or pipeline_entrypoint(spec_uri, run_id, owner),
                    submission_id=job_id or run_id,
                    metadata={"owner": owner, "run_id": run_id, "app": "mlaas4hep"},
                    runtime_env=runtime_env,
                    entrypoint_resources=entrypoint_resources,
                )
            except RuntimeError as error:
                # A head that has just started answers this until its job agent registers.
                if "No available agent" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def view(self, job_id: str) -> JobView | None:
        """The job's state, or ``None`` when the Jobs API does not know it.

        Raises :class:`JobsUnavailable` when the Jobs API cannot be reached: an unknown
        job and an unreachable head are different answers.
        """
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as error:
            if "status code 404" in str(error):
                return None
            raise JobsUnavailable(f"the Jobs API at {self.jobs_url} answered: {error}") from None
        except OSError as error:  # requests' ConnectionError and Ray's own are OSErrors
            self._client = None  # a restarted head is connected to afresh
            raise JobsUnavailable(
                f"the Jobs API at {self.jobs_url} cannot be reached: {error}"
            ) from None
        return JobView(
            job_id=job_id,
            state=JOB_TO_RUN_STATE.get(info.status, str(info.status)),
            message=info.message or "",
            metadata=dict(info.metadata or {}),
        )

    def logs(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)
        except RuntimeError:
            return ""

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self.client.stop_job(job_id))
        except RuntimeError:
            return False

    def delete(self, job_id: str) -> None:
        try:
            self.client.delete_job(job_id)
        except RuntimeError:
            return
