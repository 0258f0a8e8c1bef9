"""Flattening: events with jagged branches → one fixed-width float32 row per event.

Given :class:`~mlaas4hep.data.features.FeatureSpecs`, an event becomes the row

    [flat keys in tree order] + [key_0 … key_{jdim-1} for each jagged key]

Each value ``v`` of branch ``key`` is normalized to ``(v - min) / (max - min)`` with
the specs' ``minv``/``maxv`` (left unchanged where ``max == min``, or where the branch
never had a value). A jagged list shorter than ``jdim`` is padded with ``pad``
(the spec's ``nan``, NaN by default) and a longer one is truncated to its first
``jdim`` values.

Beside the features comes a ``mask`` of the same shape: **1 marks a padded slot**,
0 a slot holding a value of the event (MLaaS4HEP's reader computes it as
``isnan(row)``, which is the same thing for NaN padding).

The model does not see NaNs: :func:`to_model_input` turns them into 0.0, as
MLaaS4HEP's training loop does (``x_train[np.isnan(x_train)] = 0``); the mask is
kept beside the features and is not fed to the model.

Flattening writes each block into one preallocated float32 matrix: the jagged slots are
filled with the padding in bulk, then a single compiled (numba) pass over the events, row
by row, writes the values. The per-branch work in Python is only collecting each
branch's numpy buffers, so a file of ~1,000 branches costs about what one of ~100 does
per value.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import pyarrow as pa

from mlaas4hep.data.columns import Column, as_column
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.features import FeatureSpecs
from mlaas4hep.data.rootio import LABEL_COLUMN
from mlaas4hep.spec import PipelineSpec

if TYPE_CHECKING:
    import ray.data

FEATURES_COLUMN = "features"
MASK_COLUMN = "mask"


def _column(columns: Mapping[str, Any], key: str, n: int | None) -> Column:
    if key not in columns:
        raise DataError(f"branch {key!r} missing from the input")
    column = as_column(columns[key], key)
    if n is not None and column.num_events != n:
        raise DataError(f"branch {key!r}: {column.num_events} events where others have {n}")
    return column


def _as_list(column: Column) -> Column:
    """A jagged key given one number per event: a list of one value each."""
    if column.is_list:
        return column
    return Column(column.values, np.arange(len(column.values) + 1, dtype=np.int64))


def _ranges(keys: Sequence[str], specs: FeatureSpecs) -> tuple[np.ndarray, np.ndarray]:
    """``(low, span)`` per key for ``(v - low) / span``; ``(0, 1)`` leaves ``v`` as it is
    (a branch with ``max <= min``, or without any value)."""
    low = np.array([specs.minv[key] for key in keys], dtype=np.float64)
    high = np.array([specs.maxv[key] for key in keys], dtype=np.float64)
    keep = low >= high
    return np.where(keep, 0.0, low), np.where(keep, 1.0, high - low)


@numba.njit(nogil=True, cache=True)
def _fill_rows(features, mask, flat, flat_low, flat_span, offsets, values, jcol, jdim, jlow, jspan):
    """Write every event's row: flat columns, then the values of each jagged column (at
    most its dim); the jagged slots hold the padding (mask 1) beforehand."""
    for i in range(features.shape[0]):
        for c in range(flat.shape[0]):
            features[i, c] = (flat[c, i] - flat_low[c]) / flat_span[c]
        for k in range(jcol.shape[0]):
            start = offsets[k, i]
            count = min(offsets[k, i + 1] - start, jdim[k])
            col = jcol[k]
            for j in range(count):
                features[i, col + j] = (values[start + j] - jlow[k]) / jspan[k]
                mask[i, col + j] = 0


#: Largest buffer a thread keeps between calls for the kernel's inputs (bytes).
SCRATCH_BYTES = 256 * 2**20

_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialized array for the kernel's inputs, reusing this thread's last buffer of
    that name when it is big enough: fresh memory costs a page fault per 4 KiB written,
    which for a wide block's ~150 MB of inputs is a tenth of flattening it. Buffers over
    :data:`SCRATCH_BYTES` are not kept."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.nbytes < size:
        buffer = np.empty(size, dtype=np.uint8)
        setattr(_SCRATCH, name, buffer if size <= SCRATCH_BYTES else None)
    return buffer[:size].view(dtype).reshape(shape)


def flatten_columns(
    columns: Mapping[str, Any],
    specs: FeatureSpecs,
    pad: float = math.nan,
    scratch_output: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a block of events given as a mapping of branch name to values.

    Values may be Arrow, numpy, awkward arrays or Python lists (see
    :func:`~mlaas4hep.data.columns.as_column`). Returns ``(features, mask)``:
    float32 and uint8 matrices of shape ``[n_events, specs.n_features]``, mask 1 where
    a slot is padded. With ``scratch_output`` they are this thread's scratch buffers,
    overwritten by its next call (for a caller that writes them out at once). Raises
    :class:`DataError` naming a missing or unusable branch.
    """
    keys = [*specs.fkeys, *specs.jkeys]
    n = _column(columns, keys[0], None).num_events if keys else 0
    flat = _scratch("flat", (len(specs.fkeys), n), np.float64)
    for row, key in enumerate(specs.fkeys):
        column = _column(columns, key, n)
        if column.is_list:
            raise DataError(f"branch {key!r}: expected one number per event, got lists")
        flat[row] = column.values

    jkeys = [key for key in specs.jkeys if specs.jdim[key] > 0]
    jagged = [_as_list(_column(columns, key, n)) for key in jkeys]
    # All jagged values in one float64 buffer, each column's offsets shifted to its part.
    values = _scratch("values", (sum(len(c.values) for c in jagged),), np.float64)
    offsets = _scratch("offsets", (len(jagged), n + 1), np.int64)
    base = 0
    for k, column in enumerate(jagged):
        values[base : base + len(column.values)] = column.values
        np.add(column.offsets, base, out=offsets[k])
        base += len(column.values)
    jdim = np.array([specs.jdim[key] for key in jkeys], dtype=np.int64)
    jcol = len(specs.fkeys) + np.cumsum(jdim) - jdim  # first column of each jagged key

    shape = (n, specs.n_features)
    if scratch_output:
        features, mask = _scratch("features", shape, np.float32), _scratch("mask", shape, np.uint8)
    else:
        features, mask = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.uint8)
    # Most jagged slots are padding: filled in bulk first, the kernel writes the values.
    nflat = len(specs.fkeys)
    features[:, nflat:] = pad
    mask[:, :nflat] = 0
    mask[:, nflat:] = 1
    _fill_rows(
        features, mask, flat, *_ranges(specs.fkeys, specs), offsets, values,
        jcol, jdim, *_ranges(jkeys, specs),
    )  # fmt: skip
    return features, mask


def to_model_input(features: np.ndarray) -> np.ndarray:
    """What the Keras model consumes: the features with every NaN replaced by 0.0."""
    features = np.asarray(features, dtype=np.float32)
    return np.where(np.isnan(features), np.float32(0.0), features)


def flatten_table(
    batch: pa.Table,
    specs: FeatureSpecs,
    pad: float,
    identifiers: Sequence[str],
    scratch_output: bool = False,
) -> dict[str, np.ndarray]:
    """Flatten one block of events as ``read_events`` makes it: ``features``, ``mask``,
    ``label`` (float32) and the ``identifiers``; what a Ray task and a local worker
    run for each block alike. ``scratch_output``: see :func:`flatten_columns`."""
    columns = {name: batch.column(name) for name in batch.column_names}
    features, mask = flatten_columns(columns, specs, pad, scratch_output)
    out = {
        FEATURES_COLUMN: features,
        MASK_COLUMN: mask,
        LABEL_COLUMN: batch.column(LABEL_COLUMN).to_numpy().astype(np.float32),
    }
    for name in identifiers:
        out[name] = batch.column(name).to_numpy()
    return out


def flatten_dataset(
    ds: ray.data.Dataset, specs: FeatureSpecs, spec: PipelineSpec
) -> ray.data.Dataset:
    """Flatten every block of ``ds`` (as made by ``read_events``).

    Returns a dataset with columns ``features`` (float32 tensors of
    ``specs.n_features``, padded with ``spec.nan``), ``mask`` (uint8, 1 = padded),
    ``label`` (float32) and the identifier branches. Apply :func:`to_model_input`
    to ``features`` before feeding a model.
    """
    return ds.map_batches(
        flatten_table,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={"specs": specs, "pad": spec.nan, "identifiers": list(spec.identifier)},
    )


def _is_one_event(events: Mapping[str, Any], specs: FeatureSpecs) -> bool:
    if specs.fkeys and specs.fkeys[0] in events:
        return np.ndim(events[specs.fkeys[0]]) == 0
    for key in specs.jkeys:
        value = events.get(key)
        if isinstance(value, list | tuple | np.ndarray):
            return all(np.ndim(item) == 0 for item in value)
    return True


def _rows_to_columns(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, list]:
    columns: dict[str, list] = {key: [] for key in keys}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"event {i}: expected a mapping of branch name to value")
        for key in keys:
            if key not in row:
                raise DataError(f"event {i}: branch {key!r} missing")
            columns[key].append(row[key])
    return columns


def flatten_events(
    events: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    specs: FeatureSpecs,
    pad: float = math.nan,
) -> np.ndarray:
    """Flatten raw physics events the way training data was flattened.

    ``events`` is one event (branch → number, or list of numbers for a jagged branch),
    a mapping of branch → per-event values, or a list of one-event mappings.
    Returns the float32 features ``[n_events, specs.n_features]``, padded with ``pad``;
    apply :func:`to_model_input` before feeding the model.
    """
    keys = [*specs.fkeys, *specs.jkeys]
    if isinstance(events, Mapping):
        if _is_one_event(events, specs):
            columns: Mapping[str, Any] = {k: [events[k]] for k in keys if k in events}
        else:
            columns = events
    elif isinstance(events, Sequence) and not isinstance(events, str | bytes):
        columns = _rows_to_columns(events, keys)
    else:
        raise DataError("events must be a mapping of branch name to values, or a list of them")
    return flatten_columns(columns, specs, pad)[0]
