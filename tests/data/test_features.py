"""The specs pass: per-block jdim/min/max, merging, the specs file, and the Ray map-reduce."""

from __future__ import annotations

import json
import math
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from mlaas4hep.data.datasource import read_events
from mlaas4hep.data.features import (
    EMPTY_MAX,
    EMPTY_MIN,
    FeatureSpecs,
    block_specs,
    compute_specs,
    merge_specs,
)
from mlaas4hep.data.rootio import inspect_inputs, open_tree, read_table
from mlaas4hep.spec import parse_spec

HZZ = "uproot-HZZ.root"


def reference_specs(path: Path, tree: str, fkeys: list[str], jkeys: list[str]) -> dict:
    """jdim/min/max computed branch by branch straight from uproot's arrays."""
    arrays = uproot.open(path)[tree].arrays(fkeys + jkeys, library="ak")
    ref = {"jdim": {}, "minv": {}, "maxv": {}}
    for key in fkeys + jkeys:
        values = ak.to_numpy(ak.flatten(arrays[key], axis=None)).astype(np.float64)
        ref["minv"][key], ref["maxv"][key] = float(values.min()), float(values.max())
    for key in jkeys:
        ref["jdim"][key] = int(ak.max(ak.num(arrays[key])))
    return ref


def hzz_table(shared_data: Path, start: int = 0, stop: int = 2421):
    spec = parse_spec({"files": [{"path": str(shared_data / HZZ), "label": 1}], "branch": "events"})
    summary = inspect_inputs(spec)
    tree = open_tree(str(shared_data / HZZ), "events")
    return summary, read_table(tree, summary.features, start, stop, HZZ)


def test_block_specs_match_uproot_reference(shared_data: Path) -> None:
    summary, table = hzz_table(shared_data)
    specs = block_specs({name: table.column(name) for name in table.column_names})
    assert specs.fkeys == summary.flat_keys and specs.jkeys == summary.jagged_keys
    ref = reference_specs(shared_data / HZZ, "events", specs.fkeys, specs.jkeys)
    assert specs.jdim == ref["jdim"]
    assert specs.minv == pytest.approx(ref["minv"]) and specs.maxv == pytest.approx(ref["maxv"])
    assert specs.jdim["Jet_Px"] == 5 and specs.jdim["Muon_Px"] == 4
    assert specs.events == {"total": 2421}


def test_merged_block_specs_equal_whole_file_specs(shared_data: Path) -> None:
    _, whole = hzz_table(shared_data)
    full = block_specs({n: whole.column(n) for n in whole.column_names})
    parts = [
        block_specs({n: part.column(n) for n in part.column_names})
        for part in (whole.slice(0, 700), whole.slice(700, 1000), whole.slice(1700))
    ]
    merged = merge_specs(merge_specs(parts[0], parts[1]), parts[2])
    assert merged.to_dict() == full.to_dict()


def test_branch_without_values_keeps_mlaas4hep_markers() -> None:
    specs = block_specs({"x": np.array([1.0, 2.0]), "jets": [[], []]})
    assert (specs.minv["jets"], specs.maxv["jets"], specs.jdim["jets"]) == (EMPTY_MIN, EMPTY_MAX, 0)
    merged = merge_specs(specs, block_specs({"x": np.array([0.5]), "jets": [[3.0, 4.0]]}))
    assert (merged.minv["jets"], merged.maxv["jets"], merged.jdim["jets"]) == (3.0, 4.0, 2)
    assert merged.minv["x"] == 0.5 and merged.events == {"total": 3}


def test_non_finite_values_do_not_set_the_range() -> None:
    specs = block_specs({"x": np.array([np.nan, 1.0, np.inf, -2.0])})
    assert (specs.minv["x"], specs.maxv["x"]) == (-2.0, 1.0)


def test_feature_names_put_flat_keys_first_then_expanded_jagged_keys() -> None:
    specs = FeatureSpecs(
        fkeys=["a", "b"],
        jkeys=["j", "k"],
        jdim={"j": 2, "k": 3},
        minv=dict.fromkeys("abjk", 0.0),
        maxv=dict.fromkeys("abjk", 1.0),
    )
    assert specs.feature_names() == ["a", "b", "j_0", "j_1", "k_0", "k_1", "k_2"]
    assert specs.n_features == 7


def test_specs_file_round_trips_with_mlaas4hep_keys(tmp_path: Path) -> None:
    specs = block_specs({"x": np.array([1.0, 3.0]), "j": [[1.0], [2.0, 5.0]]}).finalize()
    path = tmp_path / "specs.json"
    specs.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"jdim", "minv", "maxv", "fkeys", "jkeys", "nans", "events"}
    assert data["nans"] == {"x": pytest.approx(-0.5), "j": pytest.approx(-0.25)}
    assert FeatureSpecs.load(path) == specs


def test_specs_file_missing_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="specs: missing keys jdim, jkeys"):
        FeatureSpecs.from_dict({"minv": {}, "maxv": {}, "fkeys": []})
    with pytest.raises(ValueError, match="no minv/maxv for branch 'x'"):
        FeatureSpecs.from_dict({"minv": {}, "maxv": {}, "fkeys": ["x"], "jkeys": [], "jdim": {}})


@pytest.mark.ray
def test_compute_specs_over_ray_blocks_matches_reference(ray_cluster, shared_data: Path) -> None:
    path = str(shared_data / HZZ)
    spec = parse_spec(
        {
            "files": [{"path": path, "label": 1}],
            "branch": "events",
            "chunk_size": 500,
            "identifier": ["NPrimaryVertices"],
        }
    )
    ds = read_events(spec)
    specs = compute_specs(ds, spec)
    assert "NPrimaryVertices" not in specs.fkeys and "label" not in specs.fkeys
    ref = reference_specs(shared_data / HZZ, "events", specs.fkeys, specs.jkeys)
    assert specs.jdim == ref["jdim"]
    assert specs.minv == pytest.approx(ref["minv"]) and specs.maxv == pytest.approx(ref["maxv"])
    assert specs.events == {"total": 2421, path: 2421}
    assert specs.nans["MET_px"] == pytest.approx(
        -ref["minv"]["MET_px"] / (ref["maxv"]["MET_px"] - ref["minv"]["MET_px"])
    )


@pytest.mark.ray
def test_compute_specs_merges_files_and_caps_jdim(ray_cluster, shared_data: Path) -> None:
    paths = [str(shared_data / HZZ), str(shared_data / "uproot-HZZ-zstd.root")]
    spec = parse_spec(
        {
            "files": [{"path": paths[0], "label": 1}, {"path": paths[1], "label": 0}],
            "branch": "events",
            "max_jagged_dim": 3,
            "selected_branches": ["Jet_Px", "MET_px"],
        }
    )
    specs = compute_specs(read_events(spec), spec)
    assert (specs.fkeys, specs.jkeys, specs.jdim) == (["MET_px"], ["Jet_Px"], {"Jet_Px": 3})
    assert specs.events == {"total": 4842, paths[0]: 2421, paths[1]: 2421}
    assert specs.n_features == 4
    assert not math.isnan(specs.minv["Jet_Px"])
