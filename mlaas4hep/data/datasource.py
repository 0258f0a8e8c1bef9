"""A Ray Data datasource reading TTrees of ROOT files with uproot, local or over XRootD.

:class:`RootDatasource` plans one read task per (file, entry range): ranges follow the
tree's clusters (entry offsets where every branch starts a basket) so that no basket
is decompressed twice, and hold at most ``chunk_size`` entries, or, without one, about
:data:`TASK_BYTES` of uncompressed events (a narrow tree's task then reads many
clusters, a wide tree's one or a few). Each task opens its
file, reads only the branches it needs and yields one Arrow table with

* one column per feature branch (scalars for flat branches, lists for jagged ones,
  fixed-size lists for fixed-size arrays), in tree order;
* the identifier branches;
* ``label``: the file's label, or the value of ``label_branch``, as int64;
* ``file_index``: the position of the file in the spec's list.

Class balance: the read tasks of the files are interleaved in proportion to the
events each file gives (MLaaS4HEP's chunks mix files the same way), so any prefix of
the stream holds every file's share. ``shuffle: "blocks"`` also permutes the tasks
(seeded, still streaming); ``"global"`` shuffles every event (:func:`shuffle_events`).

A worker process keeps the last few trees it opened (:class:`_OpenTrees`): opening a
wide file parses the metadata of every branch (~0.3 s for NanoAOD's ~1,000), which the
next task of the same file would otherwise pay again. A local file is reopened when its
size or modification time changed; a failed read drops the tree it used.

Each read task adds the events and Arrow bytes it produced to the Ray metrics
``mlaas4hep_data_events_read`` and ``mlaas4hep_data_bytes_read``, tagged with the
pipeline (run id), so the dashboard's metrics show each pipeline's reading.

A pipeline goes through its events several times (specs, flattening, epochs):
:func:`read_events_once` reads them into Ray's object store once when they fit
comfortably, and streams them from the files on every pass otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mlaas4hep.data.errors import DataError
from mlaas4hep.data.execution import materialize_unreserved, refresh_limits_promptly
from mlaas4hep.data.rootio import (
    DEFAULT_TIMEOUT,
    FILE_INDEX_COLUMN,
    LABEL_COLUMN,
    FileSummary,
    Handler,
    InputsSummary,
    inspect_inputs,
    open_tree,
    read_table,
)
from mlaas4hep.spec import PipelineSpec

logger = logging.getLogger(__name__)
refresh_limits_promptly()  # before this process runs any Ray Data execution

Order = Literal["none", "blocks", "global"]

#: Uncompressed bytes of events a read task reads when the spec sets no ``chunk_size``:
#: big enough that a narrow tree's task is not all overhead, small enough that a wide
#: tree's task (and its flattened output, ~2.5x bigger) stays a block Ray moves easily.
TASK_BYTES = 64 * 2**20

#: Largest share of Ray's object store that ``cache_events: "auto"`` fills with events.
CACHE_FRACTION = 0.25

#: Ray metrics of the read tasks, created once per worker process.
_COUNTERS: dict[str, Any] = {}


def events_per_file(entries: Sequence[int], nevts: int) -> list[int]:
    """Share ``nevts`` events among files in proportion to their entries (-1 = all).

    As MLaaS4HEP does, every file contributes at least one event and never more
    than it holds.
    """
    if nevts < 0:
        return list(entries)
    total = sum(entries)
    return [min(n, max(1, round(n / total * nevts))) for n in entries]


def plan_ranges(clusters: Sequence[int], stop: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split entries ``[0, stop)`` into ranges of at most ``chunk_size`` entries.

    Range edges sit on cluster boundaries where the clusters allow it; a cluster
    longer than ``chunk_size`` is cut into equal pieces.
    """
    edges = sorted({0, stop, *(c for c in clusters if 0 < c < stop)})
    ranges: list[tuple[int, int]] = []
    start = end = 0
    for edge in edges[1:]:
        if edge - start <= chunk_size:
            end = edge
            continue
        if end > start:
            ranges.append((start, end))
            start = end
        if edge - start > chunk_size:
            pieces = math.ceil((edge - start) / chunk_size)
            cuts = np.linspace(start, edge, pieces + 1).round().astype(int).tolist()
            ranges.extend(itertools.pairwise(cuts))
            start = edge
        end = edge
    if end > start:
        ranges.append((start, end))
    return ranges


@dataclass(frozen=True)
class _Chunk:
    """One read task's work: a range of entries of one file."""

    file_index: int
    path: str
    label: int | None
    start: int
    stop: int
    nbytes: int


class _OpenTrees:
    """The last ``size`` trees opened by this process, by (path, tree, handler, stamp)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.trees: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def _key(path: str, tree: str, handler: Handler) -> tuple:
        try:
            stat = os.stat(path.removeprefix("file://"))
        except OSError:  # a remote URL
            return (path, tree, handler)
        return (path, tree, handler, stat.st_size, stat.st_mtime_ns)

    def get(self, path: str, tree: str, timeout: float, handler: Handler) -> tuple[tuple, Any]:
        """Return ``(key, tree)``, opening the tree with :func:`open_tree` if not kept."""
        key = self._key(path, tree, handler)
        with self.lock:
            if key in self.trees:
                self.trees.move_to_end(key)
                return key, self.trees[key]
        opened = open_tree(path, tree, timeout, handler)
        with self.lock:
            self.trees[key] = opened
            while len(self.trees) > self.size:
                self.trees.popitem(last=False)
        return key, opened

    def drop(self, key: tuple) -> None:
        with self.lock:
            self.trees.pop(key, None)


_OPEN_TREES = _OpenTrees()


def _read_range(
    chunk: _Chunk, summary: InputsSummary, timeout: float, handler: Handler = "auto"
) -> pa.Table:
    key, tree = _OPEN_TREES.get(chunk.path, summary.tree, timeout, handler)
    where = f"{chunk.path}: tree {summary.tree!r}"
    try:
        return read_table(
            tree, summary.reads, chunk.start, chunk.stop, where, summary.preproc, summary.columns
        )
    except DataError:
        _OPEN_TREES.drop(key)  # a broken connection or a changed file: reopen next time
        raise


def _count_read(pipeline: str, events: int, nbytes: int) -> None:
    """Add one task's events and bytes to the per-pipeline Ray counters."""
    from ray.util.metrics import Counter

    if not _COUNTERS:
        for key, what in (("events", "events"), ("bytes", "Arrow bytes (uncompressed)")):
            _COUNTERS[key] = Counter(
                f"mlaas4hep_data_{key}_read",
                description=f"ROOT {what} read by the data layer, per pipeline",
                tag_keys=("pipeline",),
            )
    tags = {"pipeline": pipeline}
    if events > 0:
        _COUNTERS["events"].inc(events, tags=tags)
    if nbytes > 0:
        _COUNTERS["bytes"].inc(nbytes, tags=tags)


def _read_chunk(
    chunk: _Chunk, summary: InputsSummary, timeout: float, pipeline: str = "none"
) -> Iterable[pa.Table]:
    try:
        table = _read_range(chunk, summary, timeout)
    except DataError as error:
        if not chunk.path.startswith("root://"):
            raise
        # XRootDSource is the fast path; a read it cannot serve gets one more try
        # through uproot's fsspec handler before the task fails.
        logger.warning("%s; retrying with the fsspec handler", error)
        table = _read_range(chunk, summary, timeout, "fsspec")
    label_branch = summary.label_branch.name if summary.label_branch else None
    n = table.num_rows
    if label_branch is None:
        labels = pa.array(np.full(n, chunk.label, dtype=np.int64))
    else:
        labels = table.column(label_branch).cast(pa.int64(), safe=False)
        table = table.drop_columns([label_branch])
    table = table.append_column(LABEL_COLUMN, labels)
    table = table.append_column(FILE_INDEX_COLUMN, pa.array(np.full(n, chunk.file_index, np.int32)))
    try:
        _count_read(pipeline, n, table.nbytes)
    except Exception as error:  # metrics must never fail a read
        logger.debug("metrics not recorded: %s", error)
    yield table


class RootDatasource(Datasource):
    """Read the events of the checked inputs of a spec (see :func:`inspect_inputs`).

    ``events`` gives the entries to read from the start of each file (default: all);
    ``chunk_size`` the events per read task (default: about :data:`TASK_BYTES` each).
    The files' chunks are interleaved in proportion to their sizes; ``order="blocks"``
    permutes them with ``seed``. ``pipeline`` tags the read metrics.
    """

    def __init__(
        self,
        summary: InputsSummary,
        events: Sequence[int] | None = None,
        chunk_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        order: Order = "none",
        seed: int = 0,
        pipeline: str = "none",
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.summary = summary
        self.events = list(events) if events is not None else [f.entries for f in summary.files]
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.pipeline = pipeline
        self.chunks = self._plan()
        if order == "blocks":
            permutation = np.random.default_rng(seed).permutation(len(self.chunks))
            self.chunks = [self.chunks[i] for i in permutation]

    def _plan(self) -> list[_Chunk]:
        chunks, position = [], []
        for index, (info, count) in enumerate(zip(self.summary.files, self.events, strict=True)):
            stop = min(count, info.entries)
            for start, end in plan_ranges(info.clusters, stop, self._task_events(info)):
                nbytes = int(info.bytes_per_entry * (end - start))
                chunks.append(_Chunk(index, info.path, info.label, start, end, nbytes))
                position.append(((start + end) / 2 / stop, index))
        # Interleave: each chunk goes where its middle sits within its own file.
        return [chunk for _, chunk in sorted(zip(position, chunks, strict=True))]

    def _task_events(self, info: FileSummary) -> int:
        """Events per read task of a file: ``chunk_size``, or about :data:`TASK_BYTES`."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, int(TASK_BYTES / max(info.bytes_per_entry, 1.0)))

    def get_name(self) -> str:
        return "ReadROOT"

    def read_chunk(self, position: int) -> pa.Table:
        """The events of the chunk at ``position`` of the plan, as its read task yields them
        (for execution without Ray, :mod:`~mlaas4hep.data.datasets`)."""
        chunk = self.chunks[position]
        return next(iter(_read_chunk(chunk, self.summary, self.timeout, self.pipeline)))

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(chunk.nbytes for chunk in self.chunks)

    def _task(self, chunk: _Chunk, per_task_row_limit: int | None) -> ReadTask:
        # Each task carries what reading needs, not the file list with every cluster.
        summary, timeout = dataclasses.replace(self.summary, files=[]), self.timeout
        pipeline = self.pipeline
        metadata = BlockMetadata(
            num_rows=chunk.stop - chunk.start,
            size_bytes=int(chunk.nbytes),
            exec_stats=None,
            input_files=[chunk.path],
        )
        return ReadTask(
            lambda: _read_chunk(chunk, summary, timeout, pipeline),
            metadata,
            per_task_row_limit=per_task_row_limit,
        )

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, **kwargs
    ) -> list[ReadTask]:
        """One task per planned chunk; ``parallelism`` is a hint the plan already meets."""
        return [self._task(chunk, per_task_row_limit) for chunk in self.chunks]


def read_events(
    spec: PipelineSpec,
    summary: InputsSummary | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pipeline: str = "none",
) -> ray.data.Dataset:
    """Return the events of ``spec``'s files as a Ray Dataset (see the module docstring).

    ``summary`` is the result of :func:`inspect_inputs`, computed when not given.
    ``spec.nevts`` events are shared among the files in proportion to their sizes;
    ``spec.shuffle == "blocks"`` permutes the read tasks. ``pipeline`` (a run id) tags
    the read metrics.
    """
    return _read(root_datasource(spec, summary, timeout, pipeline), spec)


def read_events_once(
    spec: PipelineSpec,
    summary: InputsSummary | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pipeline: str = "none",
) -> ray.data.Dataset:
    """:func:`read_events` for consumers that pass over the events several times.

    The specs pass, flattening and every training epoch each go through the events.
    With ``spec.cache_events`` ``"always"``, or ``"auto"`` when their estimated Arrow
    size is at most :data:`CACHE_FRACTION` of Ray's object store, the events are read
    once into the object store (blocking until read) and every pass reuses them;
    otherwise each pass streams them from the files again, in bounded memory.
    """
    source = root_datasource(spec, summary, timeout, pipeline)
    events = _read(source, spec)
    if spec.cache_events == "never":
        return events
    if spec.cache_events == "auto":
        capacity = ray.cluster_resources().get("object_store_memory", 0)
        size = source.estimate_inmemory_data_size() or 0
        if size > CACHE_FRACTION * capacity:
            logger.info(
                "events streamed from the files on every pass: ~%.0f MB is more than %d%% "
                "of the object store (%.0f MB)",
                size / 1e6,
                CACHE_FRACTION * 100,
                capacity / 1e6,
            )
            return events
    return materialize_unreserved(events)


def root_datasource(
    spec: PipelineSpec,
    summary: InputsSummary | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pipeline: str = "none",
) -> RootDatasource:
    """The datasource of ``spec``'s events, planned as :func:`read_events` reads them."""
    summary = summary or inspect_inputs(spec, timeout)
    events = events_per_file([f.entries for f in summary.files], spec.nevts)
    order = "blocks" if spec.shuffle == "blocks" else "none"
    return RootDatasource(
        summary, events, spec.chunk_size, timeout, order, spec.training.seed, pipeline
    )


def _read(source: RootDatasource, spec: PipelineSpec) -> ray.data.Dataset:
    # One block per planned chunk: Ray would otherwise split them to reach its default
    # parallelism, and the specs pass would pay per extra block.
    read_resources = spec.resources.read_resources
    remote_args = {"resources": read_resources} if read_resources else {}
    return ray.data.read_datasource(
        source, override_num_blocks=max(1, len(source.chunks)), ray_remote_args=remote_args
    )


def shuffle_events(ds: ray.data.Dataset, spec: PipelineSpec) -> ray.data.Dataset:
    """Shuffle every row of ``ds`` when ``spec.shuffle == "global"`` (seeded), else return it.

    A global shuffle is an all-to-all exchange: Ray Data spills what does not fit in
    the object store, so it costs memory and time that the streaming orders do not.
    """
    if spec.shuffle != "global":
        return ds
    return ds.random_shuffle(seed=spec.training.seed)
