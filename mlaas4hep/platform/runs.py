"""Pipeline runs: their records in storage under ``runs/<run_id>/``.

A run's ``status.json`` is written by the pipeline API when it accepts a submission
and then by the pipeline itself (the Ray Job) as it goes through its stages, so any
replica of the API can answer for any run, and a restart loses nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mlaas4hep.platform.storage import Storage

RUN_ID_PATTERN = re.compile(r"^run-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


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

    def get(self, run_id: str) -> dict[str, Any]:
        check_run_id(run_id)
        try:
            return self.storage.read_json("runs", run_id, "status.json")
        except FileNotFoundError:
            raise RunNotFound(f"run {run_id!r} not found") from None

    def update(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the run's record (``progress`` and ``metrics`` are merged too)."""
        record = self.get(run_id)
        for key in ("progress", "metrics"):
            if key in fields and isinstance(fields[key], dict):
                fields[key] = {**record.get(key, {}), **fields[key]}
        if isinstance(fields.get("state"), RunState):
            fields["state"] = fields["state"].value
        record.update(fields, updated=now_iso())
        self.storage.write_json(record, "runs", run_id, "status.json")
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
