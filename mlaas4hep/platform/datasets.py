"""Data commands: the specs of a spec's inputs, reused when unchanged, and flattened Parquet.

``mlaas4hep specs`` and ``mlaas4hep flatten`` (and the pipeline) call these functions.

A specs file written here carries, beside MLaaS4HEP's keys, an ``inputs`` fingerprint
(:func:`input_fingerprint`): the files with their size and modification time (entries
for remote files), the tree, the branches read, ``nevts``, the preprocessing,
``max_jagged_dim`` and the padding. An existing specs file is reused only when its
fingerprint equals the current one; otherwise the specs are recomputed and
:func:`fingerprint_changes` says which input changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mlaas4hep.platform.config import PipelineSpec
from mlaas4hep.platform.rootio import LABEL_COLUMN, InputsSummary, inspect_inputs, is_remote
from mlaas4hep.platform.specs import FeatureSpecs, compute_specs

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

#: Extra key of a specs file holding the fingerprint of its inputs.
INPUTS_KEY = "inputs"
#: Folder of the Parquet files inside a ``flatten`` output folder.
EVENTS_DIR = "events"


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


def obtain_specs(
    spec: PipelineSpec,
    summary: InputsSummary | None = None,
    reuse: str | None = None,
    events: ray.data.Dataset | None = None,
    pipeline: str = "none",
) -> SpecsResult:
    """The specs of ``spec``'s inputs: those at ``reuse`` when still valid, else computed.

    ``summary`` (from :func:`inspect_inputs`) and ``events`` (from ``read_events``) are
    made when not given. Raises ``DataError`` naming the file or branch at fault.
    """
    from mlaas4hep.platform.datasource import read_events

    summary = summary or inspect_inputs(spec)
    fingerprint = input_fingerprint(spec, summary)
    specs, why = reusable_specs(reuse, fingerprint)
    reused = specs is not None
    if specs is None:
        if reuse:
            logger.info("recomputing specs: %s", why)
        specs = compute_specs(events or read_events(spec, summary, pipeline=pipeline), spec)
    result = SpecsResult(specs, specs_document(specs, fingerprint), summary, reused, why)
    logger.info("%s", result.describe())
    return result


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


@dataclass
class FlattenResult:
    """What :func:`flatten_to_parquet` wrote."""

    folder: Path
    events: int
    n_features: int
    specs: SpecsResult


def flatten_to_parquet(
    spec: PipelineSpec,
    out: str | Path,
    reuse: str | None = None,
    summary: InputsSummary | None = None,
    pipeline: str = "none",
) -> FlattenResult:
    """Flatten ``spec``'s events into Parquet files under ``out/events``.

    Columns: ``features`` and ``mask`` (fixed-size lists of ``n_features`` float32 /
    uint8, mask 1 = padded), ``label`` and the identifier branches. ``out/specs.json``
    holds the specs used (reused from ``reuse``, or ``out/specs.json`` itself, when
    computed from the same inputs) and ``out/features.json`` the feature names.
    ``summary`` (from :func:`inspect_inputs`) is made when not given.
    """
    from mlaas4hep.platform.datasource import read_events_once, shuffle_events
    from mlaas4hep.platform.flatten import flatten_dataset

    folder = Path(out)
    summary = summary or inspect_inputs(spec)
    events = read_events_once(spec, summary, pipeline=pipeline)
    reuse = reuse or spec.specs or str(folder / "specs.json")
    result = obtain_specs(spec, summary, reuse, events)
    flat = shuffle_events(flatten_dataset(events, result.specs, spec), spec)
    target = folder / EVENTS_DIR
    if target.exists():
        for old in target.glob("*.parquet"):
            old.unlink()
    flat.map_batches(_parquet_batch, batch_format="numpy", batch_size=None).write_parquet(
        str(target)
    )
    write_json(result.document, folder / "specs.json")
    names = result.specs.feature_names()
    pad = "nan" if math.isnan(spec.nan) else spec.nan
    write_json(
        {"feature_names": names, "label": LABEL_COLUMN, "pad": pad, "mask": "1 = padded"},
        folder / "features.json",
    )
    return FlattenResult(folder, result.specs.events.get("total", 0), len(names), result)


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
