"""Data commands: the specs of a spec's inputs, reused when unchanged, and flattened Parquet.

``mlaas4hep specs`` and ``mlaas4hep flatten`` (and the pipeline) call these functions.

A specs file written here carries, beside MLaaS4HEP's keys, an ``inputs`` fingerprint
(:func:`input_fingerprint`): the files with their size and modification time (entries
for remote files), the tree, the branches read, ``nevts``, the preprocessing,
``max_jagged_dim`` and the padding. An existing specs file is reused only when its
fingerprint equals the current one; otherwise the specs are recomputed and
:func:`fingerprint_changes` says which input changed.

Both commands run either on Ray or, when the inputs are local files, in processes forked
from the command (:func:`choose_execution` says which, and why): starting a Ray for a
command of a few seconds would cost more than the command, and even a running head's
object store is slower than forked processes writing their own parts. Both
executions run the same per-chunk functions (``RootDatasource.read_chunk``'s reader,
:func:`~mlaas4hep.data.features.table_specs`, :func:`write_part`) over the same read
plan, and write the same files: ``events/part-NNNNN.parquet`` holds the events of the
plan's chunk NNNNN, in the plan's order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlaas4hep.data.errors import DataError
from mlaas4hep.data.execution import ForkedWorkers, ordered_blocks, unreserved, usable_cores
from mlaas4hep.data.features import (
    FeatureSpecs,
    compute_specs,
    merged_specs,
    specs_options,
    table_specs,
)
from mlaas4hep.data.flatten import flatten_table
from mlaas4hep.data.rootio import LABEL_COLUMN, InputsSummary, inspect_inputs, is_remote
from mlaas4hep.spec import PipelineSpec

if TYPE_CHECKING:
    import ray.data

    from mlaas4hep.data.datasource import RootDatasource

logger = logging.getLogger(__name__)

#: Extra key of a specs file holding the fingerprint of its inputs.
INPUTS_KEY = "inputs"
#: Folder of the Parquet files inside a ``flatten`` output folder.
EVENTS_DIR = "events"

#: Largest share of the memory available at the start that local execution fills with
#: the events it keeps between the specs pass and flattening (else it reads them twice).
KEEP_FRACTION = 0.5

ExecutionKind = Literal["auto", "local", "ray"]


def _file_identity(path: str, entries: int) -> dict[str, Any]:
    if is_remote(path):
        return {"path": path, "entries": entries}
    local = path.removeprefix("file://")
    stat = os.stat(local)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "entries": entries}


def _preproc_content(value: str | Mapping[str, Any] | None) -> Any:
    """The preprocessing as data: a file's JSON content, so an edited file counts as a change."""
    if isinstance(value, str) and Path(value).is_file():
        try:
            return json.loads(Path(value).read_text())
        except json.JSONDecodeError:
            return Path(value).read_text()
    return value


def input_fingerprint(spec: PipelineSpec, summary: InputsSummary) -> dict[str, Any]:
    """What the specs of ``spec`` depend on (JSON-serializable; compared key by key)."""
    return {
        "files": [_file_identity(f.path, f.entries) for f in summary.files],
        "tree": summary.tree,
        "branches": [b.name for b in summary.features],
        "identifier": [b.name for b in summary.identifiers],
        "label_branch": summary.label_branch.name if summary.label_branch else None,
        "nevts": spec.nevts,
        "preproc": _preproc_content(spec.preproc),
        "max_jagged_dim": spec.max_jagged_dim,
    }


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Say, input by input, how ``new`` differs from ``old`` (empty when they are equal)."""
    changes = []
    old_files = {f["path"]: f for f in old.get("files", [])}
    new_files = {f["path"]: f for f in new.get("files", [])}
    added = [p for p in new_files if p not in old_files]
    removed = [p for p in old_files if p not in new_files]
    if added:
        changes.append(f"files added: {', '.join(added)}")
    if removed:
        changes.append(f"files removed: {', '.join(removed)}")
    for path, info in new_files.items():
        before = old_files.get(path)
        if before is not None and before != info:
            what = [k for k in sorted(set(info) | set(before)) if info.get(k) != before.get(k)]
            changes.append(f"file {path} changed ({', '.join(what)})")
    for key in sorted((set(old) | set(new)) - {"files"}):
        if old.get(key) != new.get(key):
            changes.append(f"{key} changed ({_short(old.get(key))} -> {_short(new.get(key))})")
    return changes


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(location: str) -> Any:
    import fsspec

    with fsspec.open(location, "r") as stream:
        return json.load(stream)


def reusable_specs(
    location: str | None, fingerprint: Mapping[str, Any]
) -> tuple[FeatureSpecs | None, str]:
    """Load the specs at ``location`` if they were computed from ``fingerprint``'s inputs.

    Returns ``(specs, why)``: the specs (None when they must be recomputed) and a
    sentence saying why they are reused or not.
    """
    if not location:
        return None, "no specs file given"
    try:
        data = _read_json(location)
    except FileNotFoundError:
        return None, f"{location} does not exist yet"
    except (OSError, ValueError) as error:
        return None, f"{location} is not readable JSON ({error})"
    if not isinstance(data, dict):
        return None, f"{location} is not a specs mapping"
    stored = data.get(INPUTS_KEY)
    if not isinstance(stored, dict):
        return None, f"{location} has no record of its inputs ({INPUTS_KEY!r} key)"
    changes = fingerprint_changes(stored, fingerprint)
    if changes:
        return None, f"{location} was computed from other inputs: " + "; ".join(changes)
    try:
        specs = FeatureSpecs.from_dict(data)
    except ValueError as error:
        return None, f"{location}: {error}"
    return specs, f"{location} was computed from the same inputs"


def specs_document(specs: FeatureSpecs, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a specs file: MLaaS4HEP's keys, ``truncated`` and the ``inputs``."""
    return specs.to_dict() | {INPUTS_KEY: dict(fingerprint)}


@dataclass
class SpecsResult:
    """Specs of a spec's inputs, and how they were obtained."""

    specs: FeatureSpecs
    document: dict[str, Any]
    summary: InputsSummary
    reused: bool
    why: str

    def describe(self) -> str:
        verb = "reused" if self.reused else "computed"
        specs = self.specs
        line = (
            f"specs {verb}: {specs.events.get('total', 0)} events, {len(specs.fkeys)} flat + "
            f"{len(specs.jkeys)} jagged branches, {specs.n_features} features"
        )
        return line + truncation_note(specs)


def truncation_note(specs: FeatureSpecs) -> str:
    """``"; N values beyond max_jagged_dim dropped (branch: n, ...)"`` or an empty string."""
    if not specs.truncated_total:
        return ""
    per_branch = ", ".join(f"{k}: {n}" for k, n in (specs.truncated or {}).items() if n)
    return f"; {specs.truncated_total} values beyond max_jagged_dim dropped ({per_branch})"


@dataclass(frozen=True)
class Execution:
    """Where a data command runs, and why: ``"local"`` (``workers`` processes forked from
    the command) or ``"ray"`` (the head at ``address``, or a Ray started for it)."""

    kind: Literal["local", "ray"]
    why: str
    workers: int = 1
    address: str | None = None

    def describe(self) -> str:
        if self.kind == "local":
            return f"execution: local, {self.workers} processes ({self.why})"
        return f"execution: Ray ({self.why})"


def _needs_ray(spec: PipelineSpec, summary: InputsSummary) -> str | None:
    """Why ``spec`` cannot run in forked processes, or None."""
    remote = [f.path for f in summary.files if is_remote(f.path)]
    if remote:
        # The XRootD and fsspec clients keep threads, which a forked process does not get.
        return f"remote input {remote[0]} is read by Ray tasks"
    if spec.shuffle == "global":
        return "shuffle: global needs Ray's all-to-all exchange"
    if spec.resources.read_resources:
        return "resources.read asks for Ray resources"
    return None


def choose_execution(
    spec: PipelineSpec,
    summary: InputsSummary,
    requested: ExecutionKind = "auto",
    address: str | None = None,
    connected: bool = False,
) -> Execution:
    """Choose how a data command runs ``spec``'s inputs.

    ``"auto"``: on Ray when this process is ``connected`` to it (a pipeline job) or when
    the spec needs Ray (remote inputs, global shuffle, read resources: the head at
    ``address`` is reused, else a local Ray starts); otherwise locally, one process per
    core, even when a head runs: local files are read from this machine's disks, and
    forked processes do it faster than Ray's object store (benchmarks/flatten_command.py:
    4.1x the single-process script locally, 2.8x through a running head). ``"local"``
    refuses, with a :class:`DataError`, a spec that needs Ray.
    """
    cores = usable_cores()
    need = _needs_ray(spec, summary)
    if requested == "ray":
        return Execution("ray", "asked for", address=address)
    if requested == "local":
        if need:
            raise DataError(f"local execution: {need}")
        return Execution("local", "asked for", workers=cores)
    if connected:
        return Execution("ray", "this process is connected to Ray")
    if need:
        where = f"reusing the Ray head at {address}" if address else "starting a local Ray"
        return Execution("ray", f"{need}; {where}", address=address)
    return Execution(
        "local", f"the {len(summary.files)} inputs are local files: {cores} local processes",
        workers=cores,
    )  # fmt: skip


def _specs_result(
    specs: FeatureSpecs,
    fingerprint: Mapping[str, Any],
    summary: InputsSummary,
    reused: bool,
    why: str,
) -> SpecsResult:
    result = SpecsResult(specs, specs_document(specs, fingerprint), summary, reused, why)
    logger.info("%s", result.describe())
    return result


def obtain_specs(
    spec: PipelineSpec,
    summary: InputsSummary | None = None,
    reuse: str | None = None,
    events: ray.data.Dataset | None = None,
    pipeline: str = "none",
    execution: Execution | None = None,
) -> SpecsResult:
    """The specs of ``spec``'s inputs: those at ``reuse`` when still valid, else computed.

    ``summary`` (from :func:`inspect_inputs`) is made when not given. The specs are
    computed from ``events`` (from ``read_events``) when given, else as ``execution``
    says (default: on Ray). Raises ``DataError`` naming the file or branch at fault.
    """
    summary = summary or inspect_inputs(spec)
    fingerprint = input_fingerprint(spec, summary)
    specs, why = reusable_specs(reuse, fingerprint)
    reused = specs is not None
    if specs is None:
        if reuse:
            logger.info("recomputing specs: %s", why)
        if events is None and execution is not None and execution.kind == "local":
            specs = _local_specs(spec, summary, execution.workers, pipeline)
        else:
            from mlaas4hep.data.datasource import read_events

            specs = compute_specs(events or read_events(spec, summary, pipeline=pipeline), spec)
    return _specs_result(specs, fingerprint, summary, reused, why)


def write_json(document: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``document`` as JSON to ``path`` atomically (write, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(path)
    return path


def _parquet_batch(batch: dict[str, np.ndarray]) -> pa.Table:
    """Matrices as fixed-size list columns, so any Parquet reader sees plain types."""
    columns = {}
    for name, values in batch.items():
        values = np.asarray(values)
        if values.ndim == 2:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def parquet_options(spec: PipelineSpec) -> dict[str, Any]:
    """How ``flatten`` writes its Parquet files (keyword arguments of ``pq.write_table``).

    Snappy: about as fast to write as no compression, since its output is a seventh of
    the bytes (most jagged slots are padding); zstd writes files a third smaller for
    the same time but is slower to read. No dictionary encoding: the features are
    floats, where building the dictionary costs time and saves nothing. Statistics only
    for the label and identifiers: min/max over thousands of feature slots say nothing,
    and cost a third of the write. One row group per file (one read chunk).
    """
    return {
        "compression": "snappy",
        "use_dictionary": False,
        "write_statistics": [LABEL_COLUMN, *spec.identifier],
        "row_group_size": None,
    }


def write_part(table: pa.Table, specs: FeatureSpecs, spec: PipelineSpec, path: Path) -> int:
    """Flatten one block of events (as ``read_events`` makes it) into the Parquet file
    ``path``; return its rows. A Ray task and a local worker write each part alike.

    The matrices are the thread's scratch buffers: written out before the next call."""
    flat = flatten_table(table, specs, spec.nan, list(spec.identifier), scratch_output=True)
    part = _parquet_batch(flat)
    pq.write_table(part, path, **parquet_options(spec))
    return part.num_rows


def part_name(position: int) -> str:
    """File name of the events of the read plan's chunk ``position``."""
    return f"part-{position:05d}.parquet"


def _write_parts(batch: pa.Table, specs: FeatureSpecs, spec: PipelineSpec, folder: str) -> pa.Table:
    """Ray's task for one block: write it under a temporary name (its position in the
    plan is known once the blocks come back in order); one row: the path and rows."""
    path = Path(folder) / f".part-{uuid.uuid4().hex}.parquet"
    return pa.table({"path": [str(path)], "rows": [write_part(batch, specs, spec, path)]})


@dataclass
class FlattenResult:
    """What :func:`flatten_to_parquet` wrote."""

    folder: Path
    events: int
    n_features: int
    specs: SpecsResult
    execution: Execution


@dataclass(frozen=True)
class _FlattenJob:
    """What an execution of :func:`flatten_to_parquet` needs: ``stored`` are reused specs
    (None: computed by a specs pass first), ``target`` the folder of the part files."""

    spec: PipelineSpec
    summary: InputsSummary
    stored: FeatureSpecs | None
    target: Path
    pipeline: str
    workers: int


def _clear_parts(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for old in [*target.glob("*.parquet"), *target.glob(".part-*")]:
        old.unlink()


def flatten_to_parquet(
    spec: PipelineSpec,
    out: str | Path,
    reuse: str | None = None,
    summary: InputsSummary | None = None,
    pipeline: str = "none",
    execution: Execution | None = None,
) -> FlattenResult:
    """Flatten ``spec``'s events into Parquet files under ``out/events``.

    Columns: ``features`` and ``mask`` (fixed-size lists of ``n_features`` float32 /
    uint8, mask 1 = padded), ``label`` and the identifier branches; one file per read
    chunk (:func:`part_name`). ``out/specs.json`` holds the specs used (reused from
    ``reuse``, or ``out/specs.json`` itself, when computed from the same inputs) and
    ``out/features.json`` the feature names. ``summary`` (from :func:`inspect_inputs`)
    is made when not given; ``execution`` (default: on Ray) says where it all runs.
    """
    folder = Path(out)
    summary = summary or inspect_inputs(spec)
    execution = execution or Execution("ray", "default")
    fingerprint = input_fingerprint(spec, summary)
    reuse = reuse or spec.specs or str(folder / "specs.json")
    stored, why = reusable_specs(reuse, fingerprint)
    if stored is None:
        logger.info("recomputing specs: %s", why)
    target = folder / EVENTS_DIR
    _clear_parts(target)
    run = _flatten_locally if execution.kind == "local" else _flatten_on_ray
    specs, rows = run(_FlattenJob(spec, summary, stored, target, pipeline, execution.workers))
    result = _specs_result(specs, fingerprint, summary, stored is not None, why)
    write_json(result.document, folder / "specs.json")
    names = specs.feature_names()
    pad = "nan" if math.isnan(spec.nan) else spec.nan
    write_json(
        {"feature_names": names, "label": LABEL_COLUMN, "pad": pad, "mask": "1 = padded"},
        folder / "features.json",
    )
    return FlattenResult(folder, rows, len(names), result, execution)


def _flatten_on_ray(job: _FlattenJob) -> tuple[FeatureSpecs, int]:
    """Flatten on Ray: events read into the object store once when the specs must be
    computed first (and they fit), else streamed from the files through flattening."""
    from mlaas4hep.data.datasource import (
        read_events,
        read_events_once,
        root_datasource,
        shuffle_events,
    )

    spec, summary, pipeline = job.spec, job.summary, job.pipeline
    largest = max(chunk.nbytes for chunk in root_datasource(spec, summary).chunks)
    with ordered_blocks(largest):  # blocks in the plan's order: their parts are named by it
        if job.stored is None:
            events = read_events_once(spec, summary, pipeline=pipeline)
            specs = compute_specs(events, spec)
        else:
            events, specs = read_events(spec, summary, pipeline=pipeline), job.stored
        written = unreserved(  # one row a block comes back: nothing to hold back
            shuffle_events(events, spec).map_batches(
                _write_parts,
                batch_format="pyarrow",
                batch_size=None,
                zero_copy_batch=True,
                fn_kwargs={"specs": specs, "spec": spec, "folder": str(job.target)},
            )
        ).take_all()
    for position, row in enumerate(written):
        Path(row["path"]).replace(job.target / part_name(position))
    return specs, sum(int(row["rows"]) for row in written)


def _flatten_locally(job: _FlattenJob) -> tuple[FeatureSpecs, int]:
    """Flatten in ``workers`` forked processes, each reading every ``workers``-th chunk:
    a specs pass first unless ``stored``, keeping the events read when they fit memory
    (:data:`KEEP_FRACTION`), then each chunk flattened into its part file."""
    spec, stored, target = job.spec, job.stored, job.target
    source, workers = _local_source(spec, job.summary, job.pipeline, job.workers)
    keep = stored is None and _fits_memory(source)
    if stored is None:
        logger.info("events %s", "kept in memory" if keep else "read twice: too big to keep")
    options = specs_options(spec)

    def work(index: int) -> Generator[Any, Any, None]:
        mine = range(index, len(source.chunks), workers)
        kept: dict[int, pa.Table] = {}
        specs = stored
        if specs is None:
            parts = []
            for position in mine:
                table = source.read_chunk(position)
                parts.append(table_specs(table, **options))
                if keep:
                    kept[position] = table
            specs = yield parts
        rows = 0
        for position in mine:
            table = kept.pop(position) if keep else source.read_chunk(position)
            rows += write_part(table, specs, spec, target / part_name(position))
        yield rows

    with ForkedWorkers(workers, work) as pool:
        specs = stored
        if specs is None:
            specs = merged_specs((p for parts in pool.gather() for p in parts), spec)
            pool.send(specs)
        rows = sum(pool.gather())
    return specs, rows


def _local_source(
    spec: PipelineSpec, summary: InputsSummary, pipeline: str, workers: int
) -> tuple[RootDatasource, int]:
    from mlaas4hep.data.datasource import root_datasource

    source = root_datasource(spec, summary, pipeline=pipeline)
    return source, max(1, min(workers, len(source.chunks)))


def _fits_memory(source: RootDatasource) -> bool:
    import psutil

    size = source.estimate_inmemory_data_size() or 0
    return size <= KEEP_FRACTION * psutil.virtual_memory().available


def _local_specs(
    spec: PipelineSpec, summary: InputsSummary, workers: int, pipeline: str
) -> FeatureSpecs:
    """The specs pass in ``workers`` forked processes, each reading every ``workers``-th
    chunk with the functions of the Ray tasks."""
    source, workers = _local_source(spec, summary, pipeline, workers)
    options = specs_options(spec)

    def work(index: int) -> Generator[Any, Any, None]:
        positions = range(index, len(source.chunks), workers)
        yield [table_specs(source.read_chunk(p), **options) for p in positions]

    with ForkedWorkers(workers, work) as pool:
        return merged_specs((p for parts in pool.gather() for p in parts), spec)


def error_message(error: BaseException) -> str:
    """The message of a data error, unwrapped from the Ray task error that carried it."""
    while isinstance(getattr(error, "cause", None), BaseException) and error.cause is not error:
        error = error.cause
    text = str(error).strip()
    # Ray appends the remote traceback and retry advice; keep the DataError's own line.
    match = re.search(r"(?m)^[\w.]*DataError: (.+)$", text)
    if match:
        return match.group(1).strip()
    return text.splitlines()[0] if text else type(error).__name__
