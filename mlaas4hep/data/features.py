"""The specs pass: what flattening needs to know about every feature branch.

A specs file is JSON with MLaaS4HEP's keys:

``fkeys``
    flat branches, in tree order;
``jkeys``
    jagged branches (and fixed-size arrays), in tree order;
``jdim``
    per jagged branch, the number of slots it gets: the longest list seen
    (capped by the spec's ``max_jagged_dim``);
``minv`` / ``maxv``
    per branch, the smallest and largest finite value seen, used for the
    normalization ``(v - min) / (max - min)``; a branch without any value keeps
    MLaaS4HEP's markers ``1e15`` / ``-1e15``;
``nans``
    per branch, where 0 lands after normalization (MLaaS4HEP's ``nans``);
``events``
    events seen per file, and their ``total``.

Two keys beside MLaaS4HEP's: ``truncated`` (with ``max_jagged_dim``: per jagged branch,
the values beyond the cap that flattening drops) and ``inputs`` (the fingerprint of the
inputs the specs were computed from, see :mod:`mlaas4hep.data.datasets`).

:func:`compute_specs` is a map-reduce over a Ray Dataset: each block yields its own
small :class:`FeatureSpecs` (:func:`table_specs`), and the driver merges those
(:func:`merged_specs`); the event data never leaves the workers. Local execution
(:mod:`~mlaas4hep.data.datasets`) runs the same two functions in forked processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mlaas4hep.data.columns import Column, as_column
from mlaas4hep.data.execution import unreserved
from mlaas4hep.data.rootio import FILE_INDEX_COLUMN, RESERVED_COLUMNS
from mlaas4hep.spec import PipelineSpec

if TYPE_CHECKING:
    import ray.data

#: MLaaS4HEP's min/max of a branch without any value.
EMPTY_MIN, EMPTY_MAX = 1e15, -1e15


@dataclass
class FeatureSpecs:
    """Feature layout and normalization ranges (see the module docstring)."""

    fkeys: list[str] = field(default_factory=list)
    jkeys: list[str] = field(default_factory=list)
    jdim: dict[str, int] = field(default_factory=dict)
    minv: dict[str, float] = field(default_factory=dict)
    maxv: dict[str, float] = field(default_factory=dict)
    nans: dict[str, float] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=lambda: {"total": 0})
    truncated: dict[str, int] | None = None  # set when a max_jagged_dim caps jdim

    @property
    def truncated_total(self) -> int:
        return sum((self.truncated or {}).values())

    def feature_names(self) -> list[str]:
        """Flat keys, then each jagged key expanded to ``key_0 … key_{jdim-1}``."""
        names = list(self.fkeys)
        for key in self.jkeys:
            names.extend(f"{key}_{i}" for i in range(self.jdim[key]))
        return names

    @property
    def n_features(self) -> int:
        return len(self.fkeys) + sum(self.jdim[key] for key in self.jkeys)

    def finalize(self, max_jagged_dim: int | None = None) -> FeatureSpecs:
        """Fill ``nans`` from the ranges and cap ``jdim``; return ``self``."""
        if max_jagged_dim is not None:
            self.jdim = {k: min(d, max_jagged_dim) for k, d in self.jdim.items()}
        self.nans = {}
        for key in [*self.fkeys, *self.jkeys]:
            low, high = self.minv[key], self.maxv[key]
            self.nans[key] = high if low == high else (0.0 - low) / (high - low)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = {
            "jdim": dict(self.jdim),
            "minv": dict(self.minv),
            "maxv": dict(self.maxv),
            "fkeys": list(self.fkeys),
            "jkeys": list(self.jkeys),
            "nans": dict(self.nans),
            "events": dict(self.events),
        }
        if self.truncated is not None:
            data["truncated"] = dict(self.truncated)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpecs:
        """Build from a specs mapping; raise ``ValueError`` naming a missing or bad key."""
        missing = [k for k in ("jdim", "minv", "maxv", "fkeys", "jkeys") if k not in data]
        if missing:
            raise ValueError(f"specs: missing keys {', '.join(missing)}")
        specs = cls(
            fkeys=list(data["fkeys"]),
            jkeys=list(data["jkeys"]),
            jdim={k: int(v) for k, v in data["jdim"].items()},
            minv={k: float(v) for k, v in data["minv"].items()},
            maxv={k: float(v) for k, v in data["maxv"].items()},
            nans={k: float(v) for k, v in data.get("nans", {}).items()},
            events={k: int(v) for k, v in data.get("events", {"total": 0}).items()},
        )
        if data.get("truncated") is not None:
            specs.truncated = {k: int(v) for k, v in data["truncated"].items()}
        for key in [*specs.fkeys, *specs.jkeys]:
            if key not in specs.minv or key not in specs.maxv:
                raise ValueError(f"specs: no minv/maxv for branch {key!r}")
        absent = [k for k in specs.jkeys if k not in specs.jdim]
        if absent:
            raise ValueError(f"specs: no jdim for jagged branches {', '.join(absent)}")
        return specs

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpecs:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _range(values: np.ndarray) -> tuple[float, float]:
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return EMPTY_MIN, EMPTY_MAX
    return float(values.min()), float(values.max())


def feature_keys(
    columns: Mapping[str, Any], exclude: Iterable[str] = ()
) -> tuple[list[str], list[str], dict[str, Column]]:
    """Split ``columns`` (minus ``exclude`` and the reserved columns) into flat and
    list keys, keeping their order; also return each as a :class:`Column`."""
    skip = set(exclude) | set(RESERVED_COLUMNS)
    parsed = {name: as_column(values, name) for name, values in columns.items() if name not in skip}
    fkeys = [name for name, col in parsed.items() if not col.is_list]
    jkeys = [name for name, col in parsed.items() if col.is_list]
    return fkeys, jkeys, parsed


def block_specs(
    columns: Mapping[str, Any],
    exclude: Iterable[str] = (),
    file_paths: Sequence[str] | None = None,
    max_jagged_dim: int | None = None,
) -> FeatureSpecs:
    """Specs of one block of events (a mapping of column name to values).

    Every column except ``exclude`` (identifiers) and the reserved ``label`` and
    ``file_index`` is a feature. With ``file_paths``, events are counted per file
    from the ``file_index`` column. With ``max_jagged_dim``, the values beyond it are
    counted per jagged branch in ``truncated``.
    """
    fkeys, jkeys, parsed = feature_keys(columns, exclude)
    specs = FeatureSpecs(fkeys=fkeys, jkeys=jkeys)
    if max_jagged_dim is not None:
        specs.truncated = {}
    for name, column in parsed.items():
        specs.minv[name], specs.maxv[name] = _range(column.values)
        if column.is_list:
            lengths = column.lengths
            specs.jdim[name] = int(lengths.max()) if lengths.size else 0
            if specs.truncated is not None:
                specs.truncated[name] = int(np.maximum(lengths - max_jagged_dim, 0).sum())
    n = next(iter(parsed.values())).num_events if parsed else 0
    specs.events = {"total": n}
    if file_paths is not None and FILE_INDEX_COLUMN in columns:
        counts = np.bincount(as_column(columns[FILE_INDEX_COLUMN], FILE_INDEX_COLUMN).values)
        specs.events.update({file_paths[i]: int(c) for i, c in enumerate(counts) if c})
    return specs


def merge_specs(a: FeatureSpecs, b: FeatureSpecs) -> FeatureSpecs:
    """Specs covering the events of both ``a`` and ``b`` (same branches expected).

    Keys keep ``a``'s order; keys only ``b`` has are appended.
    """
    merged = FeatureSpecs(
        fkeys=a.fkeys + [k for k in b.fkeys if k not in a.fkeys],
        jkeys=a.jkeys + [k for k in b.jkeys if k not in a.jkeys],
    )
    for key in [*merged.fkeys, *merged.jkeys]:
        merged.minv[key] = min(a.minv.get(key, EMPTY_MIN), b.minv.get(key, EMPTY_MIN))
        merged.maxv[key] = max(a.maxv.get(key, EMPTY_MAX), b.maxv.get(key, EMPTY_MAX))
    for key in merged.jkeys:
        merged.jdim[key] = max(a.jdim.get(key, 0), b.jdim.get(key, 0))
    if a.truncated is not None or b.truncated is not None:
        merged.truncated = {
            key: (a.truncated or {}).get(key, 0) + (b.truncated or {}).get(key, 0)
            for key in merged.jkeys
        }
    events = dict(a.events)
    for name, count in b.events.items():
        events[name] = events.get(name, 0) + count
    merged.events = events
    return merged


def specs_options(spec: PipelineSpec) -> dict[str, Any]:
    """The keyword arguments of :func:`table_specs` for ``spec``'s inputs."""
    return {
        "exclude": list(spec.identifier),
        "file_paths": spec.resolved_paths(),
        "max_jagged_dim": spec.max_jagged_dim,
    }


def table_specs(
    table: pa.Table, exclude: list[str], file_paths: list[str], max_jagged_dim: int | None
) -> FeatureSpecs:
    """Specs of one block of events as ``read_events`` makes it (see :func:`specs_options`);
    what a Ray task and a local worker compute for each block alike."""
    columns = {name: table.column(name) for name in table.column_names}
    return block_specs(columns, exclude, file_paths, max_jagged_dim)


def _specs_of_batch(batch: pa.Table, **options: Any) -> pa.Table:
    return pa.table({"specs": [json.dumps(table_specs(batch, **options).to_dict())]})


def merged_specs(parts: Iterable[FeatureSpecs], spec: PipelineSpec) -> FeatureSpecs:
    """The specs of all the blocks whose specs are ``parts``, finalized for ``spec``.

    The result does not depend on the order of ``parts``: ``events`` lists the total,
    then the files in the spec's order. Raises ``ValueError`` when there are none.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("specs: the dataset holds no events")
    specs = reduce(merge_specs, parts).finalize(spec.max_jagged_dim)
    order = ["total", *spec.resolved_paths()]
    specs.events = {key: specs.events[key] for key in order if key in specs.events}
    return specs


def compute_specs(ds: ray.data.Dataset, spec: PipelineSpec) -> FeatureSpecs:
    """Compute the specs of every event of ``ds`` (as made by ``read_events``).

    Each block's specs are computed where the block lives; only those small
    summaries come back to be merged. ``jdim`` is capped by ``spec.max_jagged_dim``,
    and the values the cap drops are counted in ``truncated``.
    """
    partial = unreserved(  # a few kilobytes a block: nothing to hold back
        ds.map_batches(
            _specs_of_batch,
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
            fn_kwargs=specs_options(spec),
        )
    )
    parts = [FeatureSpecs.from_dict(json.loads(row["specs"])) for row in partial.take_all()]
    return merged_specs(parts, spec)
