"""One view of a column of events, whatever container holds it.

Ray Data hands the platform Arrow tables, uproot gives awkward arrays, and an
inference request brings Python lists. :func:`as_column` turns any of them into a
:class:`Column`: numpy values plus, for list columns (jagged or fixed-size), the
offsets of each event's slice of those values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlaas4hep.data.errors import DataError


class ColumnError(DataError):
    """A column that cannot be used as a feature; the message names it."""


@dataclass(frozen=True)
class Column:
    """Numeric values of one branch for ``n`` events.

    ``offsets`` is None for a flat column (``values`` has one entry per event); for a
    list column, event ``i`` owns ``values[offsets[i]:offsets[i + 1]]``.
    """

    values: np.ndarray
    offsets: np.ndarray | None = None

    @property
    def is_list(self) -> bool:
        return self.offsets is not None

    @property
    def num_events(self) -> int:
        return len(self.values) if self.offsets is None else len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Number of values of each event (list columns only)."""
        assert self.offsets is not None
        return np.diff(self.offsets)


def _check_numeric(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype.kind not in "biuf":
        raise ColumnError(f"branch {name!r}: values of type {values.dtype} are not numeric")
    return values


def _from_offsets(lengths: np.ndarray, values: np.ndarray, name: str) -> Column:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Column(_check_numeric(values, name), offsets)


def _single_chunk(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return values


def _from_list_array(values: pa.ListArray | pa.LargeListArray, name: str) -> Column:
    """A list array without nulls, read from its own offsets and values buffers."""
    offsets = values.offsets.to_numpy()
    start, stop = int(offsets[0]), int(offsets[-1])
    flat = values.values.slice(start, stop - start).to_numpy(zero_copy_only=False)
    if start:
        offsets = offsets - start
    return Column(_check_numeric(flat, name), offsets.astype(np.int64, copy=False))


def _from_arrow(values: pa.Array | pa.ChunkedArray, name: str) -> Column:
    kind = values.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        inner = kind.value_type
        if pa.types.is_nested(inner):
            raise ColumnError(f"branch {name!r}: lists of lists (doubly-jagged) are not supported")
        values = _single_chunk(values)
        if values.null_count == 0 and not pa.types.is_fixed_size_list(kind):
            return _from_list_array(values, name)
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy()
        flat = pc.list_flatten(values)
        return _from_offsets(lengths, flat.to_numpy(zero_copy_only=False), name)
    if pa.types.is_nested(kind):
        raise ColumnError(f"branch {name!r}: Arrow type {kind} is not a number or list of numbers")
    return Column(_check_numeric(values.to_numpy(zero_copy_only=False), name))


def _from_numpy(values: np.ndarray, name: str) -> Column:
    if values.dtype == object:
        return _from_python(list(values), name)
    if values.ndim == 1:
        return Column(_check_numeric(values, name))
    if values.ndim == 0:
        return Column(_check_numeric(values.reshape(1), name))
    rows = values.reshape(len(values), -1)
    lengths = np.full(len(rows), rows.shape[1], dtype=np.int64)
    return _from_offsets(lengths, rows.reshape(-1), name)


def _from_awkward(values: ak.Array, name: str) -> Column:
    # What uproot reads is taken from the layout's buffers as they are (no copy, and none
    # of the high-level functions' per-call cost, which adds up over ~1,000 branches).
    layout = values.layout
    if isinstance(layout, ak.contents.NumpyArray) and layout.data.ndim == 1:
        return Column(_check_numeric(np.asarray(layout.data), name))
    if values.ndim == 1:
        return Column(_check_numeric(ak.to_numpy(values), name))
    if values.ndim > 2:
        raise ColumnError(f"branch {name!r}: lists of lists (doubly-jagged) are not supported")
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(
        layout.content, ak.contents.NumpyArray
    ):
        offsets = np.asarray(layout.offsets.data).astype(np.int64, copy=False)
        start, stop = int(offsets[0]), int(offsets[-1])
        flat = np.asarray(layout.content.data)[start:stop]
        return Column(_check_numeric(flat, name), offsets - start if start else offsets)
    lengths = ak.to_numpy(ak.num(values, axis=1)).astype(np.int64)
    return _from_offsets(lengths, ak.to_numpy(ak.flatten(values, axis=1)), name)


def _from_python(values: list[Any], name: str) -> Column:
    if not any(isinstance(v, list | tuple | np.ndarray) for v in values):
        return Column(_check_numeric(np.asarray(values), name))
    rows = [np.atleast_1d(np.asarray(v)) for v in values]
    if any(row.ndim > 1 for row in rows):
        raise ColumnError(f"branch {name!r}: lists of lists (doubly-jagged) are not supported")
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    flat = np.concatenate(rows) if rows else np.empty(0)
    if flat.dtype == object:
        raise ColumnError(f"branch {name!r}: values are not numeric")
    return _from_offsets(lengths, flat, name)


def as_column(values: Any, name: str) -> Column:
    """Return ``values`` (Arrow, numpy, awkward, Python list or scalar) as a :class:`Column`.

    Raises :class:`ColumnError` naming ``name`` for strings, objects and lists of lists.
    """
    try:
        if isinstance(values, pa.Array | pa.ChunkedArray):
            return _from_arrow(values, name)
        if isinstance(values, ak.Array):
            return _from_awkward(values, name)
        if isinstance(values, np.ndarray):
            return _from_numpy(values, name)
        if isinstance(values, list | tuple):
            return _from_python(list(values), name)
        if np.isscalar(values) and not isinstance(values, str | bytes):
            return Column(_check_numeric(np.asarray([values]), name))
    except ColumnError:
        raise
    except (TypeError, ValueError, pa.ArrowException) as error:
        raise ColumnError(f"branch {name!r}: cannot read values: {error}") from None
    raise ColumnError(f"branch {name!r}: unsupported value of type {type(values).__name__}")
