"""Pipeline runs: their records in storage under ``runs/<run_id>/``.

A run's ``status.json`` is written by the pipeline API when it accepts a submission
and then by the pipeline itself (the Ray Job) as it goes through its stages, so any
replica of the API can answer for any run, and a restart loses nothing.

Every update reads, merges and writes the record under the run's lock file
(:meth:`~mlaas4hep.store.storage.Storage.lock`), so no writer loses another's
change, and a finished run keeps how it ended: a cancel is never overwritten by the
job's own later updates.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mlaas4hep.store.storage import Storage

RUN_ID_PATTERN = re.compile(r"^run-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
#: Lock file of a run's record, in its folder.
LOCK_FILE = ".status.lock"
#: Fields of a finished run's record that only an update naming its state may change.
OUTCOME_FIELDS = ("state", "stage", "message")


class RunState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}


class RunNotFound(LookupError):
    pass


class RunStateConflict(RuntimeError):
    """The run is not in a state the update expects (``state`` is the one it is in)."""

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(f"run {run_id!r} is {state.lower()}")
        self.state = state


def new_run_id() -> str:
    """A sortable, unguessable run id such as ``run-20261125-071500-a1b2c3``."""
    now = dt.datetime.now(dt.UTC)
    return f"run-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id or ""):
        raise RunNotFound(f"run {run_id!r} not found")
    return run_id


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunStore:
    """Create, update and read run records in a :class:`Storage`."""

    storage: Storage

    def create(self, run_id: str, owner: str, name: str, **fields: Any) -> dict[str, Any]:
        record = {
            "id": check_run_id(run_id),
            "owner": owner,
            "name": name,
            "state": RunState.PENDING.value,
            "stage": "submitted",
            "message": "",
            "created": now_iso(),
            "updated": now_iso(),
            "progress": {},
            "metrics": {},
            "model": None,
            **fields,
        }
        self.storage.write_json(record, "runs", run_id, "status.json")
        return record

    def spec_uri(self, run_id: str) -> str:
        """URI of the spec a run's job reads (``runs/<run_id>/spec.json``)."""
        return self.storage.uri("runs", check_run_id(run_id), "spec.json")

    def get(self, run_id: str) -> dict[str, Any]:
        check_run_id(run_id)
        try:
            return self.storage.read_json("runs", run_id, "status.json")
        except FileNotFoundError:
            raise RunNotFound(f"run {run_id!r} not found") from None

    def update(
        self, run_id: str, *, only_if: Collection[RunState] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Merge ``fields`` into the run's record (``progress`` and ``metrics`` are merged
        too), in one step under the run's lock.

        ``only_if``: the states the run must be in, else :class:`RunStateConflict`; it
        also lets the update change a finished run's state. Without it a finished run
        keeps its state, stage and message (the other fields are merged).
        """
        self.get(run_id)  # RunNotFound before any lock file is made
        try:
            with self.storage.lock("runs", run_id, LOCK_FILE):
                record = self.get(run_id)
                state = RunState(record["state"])
                if only_if is not None and state not in only_if:
                    raise RunStateConflict(run_id, state.value)
                if only_if is None and state.finished:
                    fields = {k: v for k, v in fields.items() if k not in OUTCOME_FIELDS}
                for key in ("progress", "metrics"):
                    if key in fields and isinstance(fields[key], dict):
                        fields[key] = {**record.get(key, {}), **fields[key]}
                if isinstance(fields.get("state"), RunState):
                    fields["state"] = fields["state"].value
                record.update(fields, updated=now_iso())
                self.storage.write_json(record, "runs", run_id, "status.json")
        except FileNotFoundError:  # the run's folder was deleted meanwhile
            raise RunNotFound(f"run {run_id!r} not found") from None
        return record

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Records of every run (of ``owner`` when given), newest first."""
        records = []
        for run_id in reversed(self.storage.listdir("runs")):
            if not RUN_ID_PATTERN.match(run_id):
                continue
            try:
                record = self.get(run_id)
            except RunNotFound:
                continue
            if owner is None or record.get("owner") == owner:
                records.append(record)
        return records

    def delete(self, run_id: str) -> None:
        check_run_id(run_id)
        self.storage.delete("runs", run_id)
