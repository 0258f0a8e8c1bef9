"""The per-user storage quota: what a user's work stores, and room reserved atomically.

:func:`owner_usage` counts everything stored for one owner: their uploads
(``uploads/<owner>/``), their pipeline runs (``runs/<id>/``: multipart inputs, artifacts,
logs, checkpoints), the models they own (``models/<name>/``, every version) and their
batch predictions (``predictions/<id>/``). Hidden names (``.upload-*``, ``.tmp-*``,
``.staging-*``) are writes in flight and are not counted: the writer holds a reservation
for them.

A :class:`Reservation` is room taken in a per-owner ledger before bytes are written. Each
grant is decided under the ledger's lock from a fresh :func:`owner_usage` plus the other
writers' reservations, so two requests (threads, Serve replicas, processes) can never
both take the last bytes of a quota. A writer releases its reservation only once what it
wrote is visible in storage (:meth:`Reservation.commit` does both in one step under the
file ledger's lock), so its bytes are counted all the time. Reservations expire
after :data:`RESERVATION_TTL_S` without use, so a writer that died frees its room.

Where the ledger lives depends on the storage:

* a local or shared (NFS) folder: ``<storage>/.quota/<owner>.json``, guarded by an
  exclusive ``flock`` on ``<owner>.lock`` beside it (works across processes and, on
  NFSv4, across nodes);
* object stores (``s3://`` ...), where no file lock exists: a detached Ray actor
  (:class:`QuotaLedger`, named after :data:`LEDGER_ACTOR` and the storage root) whose
  methods run one at a time keeps the reservations in memory and reads usage from
  storage itself. Its state is only reservations in flight: when it restarts, writers in
  flight lose their room and take it again on their next grant.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mlaas4hep.store.storage import Storage, storage_error

#: Seconds a reservation lives without a grant or a refresh.
RESERVATION_TTL_S = 3600.0
#: Room a streaming write reserves ahead of what it wrote, so it asks the ledger rarely.
RESERVE_STEP_BYTES = 8 * 1024**2
LEDGER_ACTOR = "mlaas4hep-quota-ledger"
LEDGER_NAMESPACE = "mlaas4hep"
LEDGER_FOLDER = ".quota"
T = TypeVar("T")


class QuotaExceeded(Exception):
    """A write that does not fit the owner's quota (HTTP 413); ``used`` counts the bytes
    stored and reserved by others when it was refused."""

    status = 413

    def __init__(self, limit: int, used: int, needed: int) -> None:
        super().__init__(
            f"your storage quota of {limit} bytes is full or too small for {needed} more "
            f"bytes ({used} bytes used); delete files, pipelines or models first"
        )
        self.limit = limit
        self.used = used
        self.needed = needed

    def __reduce__(self) -> tuple[Any, ...]:  # crosses processes (the ledger actor)
        return (QuotaExceeded, (self.limit, self.used, self.needed))


def tree_size(storage: Storage, *parts: str) -> int:
    """Bytes of the files below ``parts`` (a file's own size), hidden names left out."""
    base = storage.path(*parts)
    fs = storage.fs
    if not fs.exists(base):
        return 0
    if not fs.isdir(base):
        return int(fs.size(base))
    total = 0
    for full, info in fs.find(base, detail=True).items():
        rel = posixpath.relpath(full, base)
        if not any(p.startswith(".") for p in rel.split("/")):
            total += int(info.get("size") or 0)
    return total


def local_size(folder: Path) -> int:
    """Bytes of the files below the local ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def owner_usage(storage: Storage, owner: str) -> int:
    """Bytes everything of ``owner`` takes in ``storage`` (see the module docstring)."""
    from mlaas4hep.store.registry import ModelRegistry
    from mlaas4hep.store.runs import RunStore

    total = tree_size(storage, "uploads", owner)
    for record in RunStore(storage).list(owner):
        total += tree_size(storage, "runs", record["id"])
    for model in ModelRegistry(storage).list_records():
        if model.owner == owner:
            total += tree_size(storage, "models", model.name)
    for prediction in storage.listdir("predictions"):
        try:
            request = storage.read_json("predictions", prediction, "request.json")
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(request, dict) and request.get("owner") == owner:
            total += tree_size(storage, "predictions", prediction)
    return total


def decide(
    entries: dict[str, dict[str, float]],
    usage: int,
    limit: int,
    rid: str,
    need: int,
    want: int,
    credit: int = 0,
) -> int:
    """Grant reservation ``rid`` at least ``need`` and at most ``want`` bytes in ``entries``
    (``{rid: {"bytes", "expires"}}``, changed in place); return the bytes granted.

    ``credit`` is stored data the write replaces (a file overwritten). Expired entries are
    dropped. :class:`QuotaExceeded` when ``need`` does not fit.
    """
    now = time.time()
    for key in [k for k, e in entries.items() if e["expires"] < now]:
        del entries[key]
    others = sum(int(e["bytes"]) for k, e in entries.items() if k != rid)
    room = limit - usage - others + credit
    if need > room:
        raise QuotaExceeded(limit, usage + others - credit, need)
    granted = max(need, min(want, room))
    entries[rid] = {"bytes": granted, "expires": now + RESERVATION_TTL_S}
    return granted


class Ledger(Protocol):
    """Where reservations are kept and granted atomically."""

    def reserve(
        self, owner: str, limit: int, rid: str, need: int, want: int, credit: int
    ) -> int: ...

    def release(self, owner: str, rid: str) -> None: ...

    def commit(self, owner: str, rid: str, action: Callable[[], T]) -> T: ...


@dataclass
class FileLedger:
    """Reservations in ``<storage>/.quota/<owner>.json`` under an exclusive ``flock``."""

    storage: Storage

    @contextlib.contextmanager
    def _locked(self, owner: str) -> Iterator[tuple[dict[str, dict[str, float]], Path]]:
        folder = Path(self.storage.path(LEDGER_FOLDER))
        folder.mkdir(parents=True, exist_ok=True)
        book = folder / f"{owner}.json"
        with open(folder / f"{owner}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    entries = json.loads(book.read_text())
                except (FileNotFoundError, ValueError):
                    entries = {}
                yield entries, book
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _save(entries: dict[str, dict[str, float]], book: Path) -> None:
        """Replace the ledger; :class:`~mlaas4hep.store.storage.StorageFull` when there
        is no room, with no temporary file left behind."""
        tmp = book.with_name(f".{book.name}.{uuid.uuid4().hex}")
        try:
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, book)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise storage_error(error, str(book), "write") from error

    def reserve(self, owner: str, limit: int, rid: str, need: int, want: int, credit: int) -> int:
        """See :func:`decide`; usage is read while the owner's lock is held."""
        with self._locked(owner) as (entries, book):
            granted = decide(
                entries, owner_usage(self.storage, owner), limit, rid, need, want, credit
            )
            self._save(entries, book)
            return granted

    def release(self, owner: str, rid: str) -> None:
        self.commit(owner, rid, lambda: None)

    def commit(self, owner: str, rid: str, action: Callable[[], T]) -> T:
        """Run ``action`` (the write becoming visible, e.g. a rename) and drop the
        reservation under one lock, so its bytes never count twice."""
        with self._locked(owner) as (entries, book):
            result = action()
            if entries.pop(rid, None) is not None:
                self._save(entries, book)
            return result


class QuotaLedger:
    """Body of the Ray actor keeping the reservations of a storage without file locks;
    one method runs at a time, so each grant is atomic."""

    def __init__(self, storage_root: str) -> None:
        self.storage = Storage(storage_root)
        self.entries: dict[str, dict[str, dict[str, float]]] = {}

    def reserve(self, owner: str, limit: int, rid: str, need: int, want: int, credit: int) -> int:
        usage = owner_usage(self.storage, owner)
        return decide(self.entries.setdefault(owner, {}), usage, limit, rid, need, want, credit)

    def release(self, owner: str, rid: str) -> None:
        self.entries.get(owner, {}).pop(rid, None)


@dataclass
class ActorLedger:
    """Client of the :class:`QuotaLedger` actor of ``storage`` (one per storage root and
    cluster, started on first use)."""

    storage: Storage
    _actor: Any = None

    @property
    def actor_name(self) -> str:
        digest = hashlib.sha256(self.storage.root_uri.encode()).hexdigest()[:12]
        return f"{LEDGER_ACTOR}-{digest}"

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            actor = ray.remote(num_cpus=0, max_concurrency=1)(QuotaLedger)
            self._actor = actor.options(
                name=self.actor_name,
                namespace=LEDGER_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
            ).remote(self.storage.root_uri)
        return self._actor

    def reserve(self, owner: str, limit: int, rid: str, need: int, want: int, credit: int) -> int:
        import ray

        try:
            return ray.get(self._handle().reserve.remote(owner, limit, rid, need, want, credit))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None

    def release(self, owner: str, rid: str) -> None:
        import ray

        ray.get(self._handle().release.remote(owner, rid))

    def commit(self, owner: str, rid: str, action: Callable[[], T]) -> T:
        """Run ``action``, then drop the reservation (its bytes count twice in between)."""
        result = action()
        self.release(owner, rid)
        return result


def ledger_of(storage: Storage) -> Ledger:
    """The ledger that fits ``storage``: a locked file for folders, the actor otherwise."""
    return FileLedger(storage) if storage.is_local else ActorLedger(storage)


@dataclass
class Quota:
    """The quota of ``limit`` bytes of ``owner`` in ``storage``."""

    storage: Storage
    owner: str
    limit: int
    ledger: Ledger | None = None

    def __post_init__(self) -> None:
        if self.ledger is None:
            self.ledger = ledger_of(self.storage)

    def usage(self) -> int:
        """Bytes stored for the owner now (reservations in flight not counted)."""
        return owner_usage(self.storage, self.owner)

    def reservation(self, credit: int = 0) -> Reservation:
        """A new, empty reservation; ``credit`` bytes of stored data it will replace."""
        return Reservation(self, credit=credit)

    @contextlib.contextmanager
    def holding(self, nbytes: int, credit: int = 0) -> Iterator[Reservation]:
        """Room for a write of ``nbytes`` (replacing ``credit`` stored bytes), held while
        the block writes; :class:`QuotaExceeded` before the block when it does not fit.
        Leave the block only once the write is visible in storage."""
        with self.reservation(credit) as held:
            held.take(nbytes, nbytes)
            yield held

    def check_room(self, needed: int) -> None:
        """:class:`QuotaExceeded` unless ``needed`` more bytes fit now (nothing is kept)."""
        with self.holding(needed):
            pass


def check_run_outputs(storage: Storage, run_id: str, owner: str, bundle: Path) -> None:
    """:class:`QuotaExceeded` when the model folder ``bundle`` a run is about to register
    does not fit its owner's quota (the run's artifacts and checkpoints count already).

    The quota is the one recorded in the run by the API (``quota_bytes``); a run started
    by an operator (``mlaas4hep run``) has none and is not bounded.
    """
    from mlaas4hep.store.runs import RunStore

    limit = RunStore(storage).get(run_id).get("quota_bytes")
    if limit:
        Quota(storage, owner, int(limit)).check_room(local_size(bundle))


@dataclass
class Reservation:
    """Room one write holds in its owner's quota; a context manager that releases it.

    ``take(n)`` asks for room for ``n`` more bytes (the grant grows ahead to ``total``,
    the size the write expects to reach when it is known, else by
    :data:`RESERVE_STEP_BYTES`); ``give_back(n)`` returns bytes of a dropped write.
    """

    quota: Quota
    credit: int = 0
    used: int = 0
    granted: int = 0
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def take(self, nbytes: int, total: int | None = None) -> None:
        """Count ``nbytes`` more; :class:`QuotaExceeded` (nothing counted) when they do
        not fit."""
        self.used += nbytes
        if self.used <= self.granted:
            return
        want = max(self.used, total) if total is not None else self.used + RESERVE_STEP_BYTES
        assert self.quota.ledger is not None
        try:
            self.granted = self.quota.ledger.reserve(
                self.quota.owner, self.quota.limit, self.rid, self.used, want, self.credit
            )
        except QuotaExceeded:
            self.used -= nbytes
            raise

    def covers(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the room already granted (no ledger call)."""
        return self.used + nbytes <= self.granted

    def give_back(self, nbytes: int) -> None:
        """Stop counting ``nbytes`` (a dropped write); the grant stays for the next one."""
        self.used = max(0, self.used - nbytes)

    def release(self) -> None:
        """Free the room (call once what was written is visible in storage)."""
        self.commit(lambda: None)

    def commit(self, action: Callable[[], T]) -> T:
        """Run ``action``, which makes the write visible, and free the room with it."""
        if not self.granted:
            return action()
        assert self.quota.ledger is not None
        result = self.quota.ledger.commit(self.quota.owner, self.rid, action)
        self.granted = 0
        return result

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
