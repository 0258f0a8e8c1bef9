"""Flattening jagged events into fixed-width rows, checked against uproot's own arrays."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import uproot
from root_helpers import one_file_spec

from mlaas4hep.data.datasource import read_events
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.features import FeatureSpecs, block_specs, compute_specs
from mlaas4hep.data.flatten import (
    flatten_columns,
    flatten_dataset,
    flatten_events,
    to_model_input,
)
from mlaas4hep.data.rootio import inspect_inputs, open_tree, read_table
from mlaas4hep.spec import parse_spec

HZZ = "uproot-HZZ.root"


def reference_rows(events: list[dict], specs: FeatureSpecs, pad: float):
    """Event-by-event flattening, the way MLaaS4HEP's reader builds one row at a time."""

    def norm(key: str, value: float) -> float:
        low, high = specs.minv[key], specs.maxv[key]
        return value if low >= high else (value - low) / (high - low)

    rows, masks = [], []
    for event in events:
        row = [norm(k, float(event[k])) for k in specs.fkeys]
        mask = [0] * len(specs.fkeys)
        for key in specs.jkeys:
            values = list(event[key])
            for i in range(specs.jdim[key]):
                padded = i >= len(values)
                row.append(pad if padded else norm(key, float(values[i])))
                mask.append(int(padded))
        rows.append(row)
        masks.append(mask)
    return np.array(rows, dtype=np.float32), np.array(masks, dtype=np.uint8)


@pytest.fixture(scope="module")
def hzz(shared_data: Path):
    """HZZ's feature branches as an Arrow table, their specs, and uproot's own events."""
    path = shared_data / HZZ
    spec = parse_spec({"files": [{"path": str(path), "label": 1}], "branch": "events"})
    summary = inspect_inputs(spec)
    table = read_table(open_tree(str(path), "events"), summary.features, 0, 2421, HZZ)
    columns = {name: table.column(name) for name in table.column_names}
    specs = block_specs(columns).finalize()
    names = [b.name for b in summary.features]
    events = uproot.open(path)["events"].arrays(names, library="ak").to_list()
    return columns, specs, events


def test_hzz_flattening_matches_uproot_values_padding_mask_and_order(hzz) -> None:
    columns, specs, events = hzz
    features, mask = flatten_columns(columns, specs)
    ref_features, ref_mask = reference_rows(events, specs, math.nan)
    assert features.shape == (2421, specs.n_features) == (2421, 28 + sum(specs.jdim.values()))
    assert features.dtype == np.float32 and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(features, ref_features, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.array_equal(np.isnan(features), mask.astype(bool))  # NaN exactly where padded


def test_jet_slots_hold_each_events_jets_in_order(hzz) -> None:
    columns, specs, events = hzz
    features, mask = flatten_columns(columns, specs)
    names = specs.feature_names()
    first = names.index("Jet_E_0")
    low, high = specs.minv["Jet_E"], specs.maxv["Jet_E"]
    for i in (0, 1, 7, 2420):
        jets = events[i]["Jet_E"]
        got = features[i, first : first + specs.jdim["Jet_E"]]
        np.testing.assert_allclose(got[: len(jets)] * (high - low) + low, jets, rtol=1e-5)
        assert mask[i, first + len(jets) : first + specs.jdim["Jet_E"]].all()


def test_sliced_chunked_and_awkward_inputs_flatten_like_one_arrow_table(
    hzz, shared_data: Path
) -> None:
    columns, specs, _ = hzz
    whole, _ = flatten_columns(columns, specs)  # the smaller blocks reuse its buffers
    table = pa.table(columns)
    sliced = table.slice(100, 400)  # list offsets no longer start at 0
    two_chunks = pa.concat_tables([table.slice(100, 150), table.slice(250, 250)])
    arrays = uproot.open(shared_data / HZZ)["events"].arrays(list(columns), library="ak")
    for label, block in (
        ("sliced arrow", {n: sliced.column(n) for n in sliced.column_names}),
        ("chunked arrow", {n: two_chunks.column(n) for n in two_chunks.column_names}),
        ("sliced awkward", {n: arrays[n][100:500] for n in columns}),
    ):
        features, _ = flatten_columns(block, specs)
        np.testing.assert_array_equal(features, whole[100:500], err_msg=label)


def test_lists_longer_than_jdim_are_truncated_and_custom_pad_used() -> None:
    columns = {"x": np.array([1.0, 2.0, 3.0]), "j": [[10.0, 20.0, 30.0], [], [40.0]]}
    specs = block_specs(columns).finalize(max_jagged_dim=2)
    features, mask = flatten_columns(columns, specs, pad=-1.0)
    np.testing.assert_allclose(
        features, [[0.0, 0.0, 1 / 3], [0.5, -1.0, -1.0], [1.0, 1.0, -1.0]], rtol=1e-6
    )
    np.testing.assert_array_equal(mask, [[0, 0, 0], [0, 1, 1], [0, 0, 1]])


def test_constant_branch_is_left_unnormalized() -> None:
    columns = {"c": np.array([7.0, 7.0]), "j": [[3.0], [3.0]]}
    features, _ = flatten_columns(columns, block_specs(columns).finalize())
    np.testing.assert_array_equal(features, [[7.0, 3.0], [7.0, 3.0]])


def test_every_dtype_and_fixed_size_arrays_flatten(shared_data: Path) -> None:
    path = shared_data / "uproot-sample-6.20.04-zlib.root"
    spec = parse_spec({"files": [{"path": str(path), "label": 0}], "branch": "sample"})
    with pytest.warns(UserWarning, match="str"):
        summary = inspect_inputs(spec)
    table = read_table(open_tree(str(path), "sample"), summary.features, 0, 30, str(path))
    columns = {name: table.column(name) for name in table.column_names}
    specs = block_specs(columns).finalize()
    features, mask = flatten_columns(columns, specs)
    assert specs.jdim["af8"] == 3 and specs.jdim["Ai8"] == 4
    events = uproot.open(path)["sample"].arrays([b.name for b in summary.features]).to_list()
    ref_features, ref_mask = reference_rows(events, specs, math.nan)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(features, ref_features, rtol=1e-6, equal_nan=True)


def test_wide_nanoaod_flattens_with_bools_and_uint64(shared_data: Path) -> None:
    path = shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
    spec = one_file_spec(path, "Events", identifier=["run", "luminosityBlock", "event"])
    summary = inspect_inputs(spec)
    table = read_table(open_tree(str(path), "Events"), summary.features, 0, 200, str(path))
    columns = {name: table.column(name) for name in table.column_names}
    specs = block_specs(columns).finalize()
    start = time.perf_counter()
    features, mask = flatten_columns(columns, specs)
    assert time.perf_counter() - start < 0.5
    assert features.shape == (200, specs.n_features) and specs.n_features > 2000
    lengths = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in specs.jkeys}
    padded = sum(
        sum(specs.jdim[k] - min(len(v), specs.jdim[k]) for v in lengths[k]) for k in specs.jkeys
    )
    assert mask.sum() == padded
    flags = [k for k in specs.fkeys if table.schema.field(k).type == pa.bool_()]
    columns_of_flags = features[:, [specs.fkeys.index(k) for k in flags]]
    assert flags and np.isin(columns_of_flags, (0.0, 1.0)).all()


def test_to_model_input_turns_padding_into_zeros() -> None:
    features = np.array([[0.5, np.nan], [np.nan, 1.0]], dtype=np.float32)
    out = to_model_input(features)
    np.testing.assert_array_equal(out, [[0.5, 0.0], [0.0, 1.0]])
    assert out.dtype == np.float32 and np.isnan(features).sum() == 2


def test_flatten_events_matches_training_rows(hzz) -> None:
    columns, specs, events = hzz
    expected, _ = flatten_columns(columns, specs)
    rows = flatten_events(events[:5], specs)
    np.testing.assert_array_equal(rows, expected[:5])
    one = flatten_events(events[3], specs)
    np.testing.assert_array_equal(one, expected[3:4])
    by_column = {k: [e[k] for e in events[:4]] for k in specs.fkeys + specs.jkeys}
    np.testing.assert_array_equal(flatten_events(by_column, specs), expected[:4])


def test_flatten_events_names_missing_branch(hzz) -> None:
    _, specs, events = hzz
    event = dict(events[0])
    del event["Muon_Px"]
    with pytest.raises(DataError, match=r"event 0: branch 'Muon_Px' missing"):
        flatten_events([event], specs)
    with pytest.raises(DataError, match=r"branch 'Muon_Px' missing from the input"):
        flatten_events(event, specs)


def test_flatten_events_refuses_lists_for_flat_and_strings(hzz) -> None:
    _, specs, events = hzz
    with pytest.raises(DataError, match=r"branch 'MET_px': values of type <U3 are not numeric"):
        flatten_events({**events[0], "MET_px": "abc"}, specs)
    bad = [{**events[0], "NJet": [1, 2]}]
    with pytest.raises(DataError, match=r"branch 'NJet': expected one number per event"):
        flatten_events(bad, specs)


@pytest.mark.ray
def test_flatten_dataset_matches_local_flattening(ray_cluster, shared_data: Path) -> None:
    path = shared_data / HZZ
    spec = one_file_spec(path, "events", chunk_size=1000, identifier=["NPrimaryVertices"])
    ds = read_events(spec)
    specs = compute_specs(ds, spec)
    batch = flatten_dataset(ds, specs, spec).take_batch(5000, batch_format="numpy")
    assert set(batch) == {"features", "mask", "label", "NPrimaryVertices"}
    order = np.argsort(batch["NPrimaryVertices"], kind="stable")  # blocks may come in any order
    tree = uproot.open(path)["events"]
    events = tree.arrays(specs.fkeys + specs.jkeys).to_list()
    npv = tree["NPrimaryVertices"].array(library="np")
    ref_features, ref_mask = reference_rows(events, specs, math.nan)
    ref_order = np.argsort(npv, kind="stable")
    assert batch["features"].shape == (2421, specs.n_features)
    assert batch["label"].dtype == np.float32 and (batch["label"] == 1.0).all()
    assert sorted(batch["NPrimaryVertices"]) == sorted(npv)
    got = {tuple(np.nan_to_num(r, nan=-9)) for r in batch["features"][order]}
    want = {tuple(np.nan_to_num(r, nan=-9)) for r in ref_features[ref_order]}
    assert got == want
    assert batch["mask"].sum() == ref_mask.sum()


def test_flattening_keeps_no_input_buffer_over_the_scratch_limit(hzz, monkeypatch) -> None:
    from mlaas4hep.data import flatten

    columns, specs, _ = hzz
    expected, _ = flatten_columns(columns, specs)
    assert flatten._SCRATCH.flat.nbytes >= 8 * len(specs.fkeys) * 2421  # kept for the next
    monkeypatch.setattr(flatten, "_SCRATCH", threading.local())  # a thread's first call
    monkeypatch.setattr(flatten, "SCRATCH_BYTES", 0)
    features, _ = flatten_columns(columns, specs)
    np.testing.assert_array_equal(features, expected)
    assert flatten._SCRATCH.flat is None and flatten._SCRATCH.offsets is None
