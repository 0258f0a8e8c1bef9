"""MLaaS4HEP preprocessing: new branches from expressions, flat and jagged cuts."""

from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pytest
import uproot
from root_helpers import one_file_spec

from mlaas4hep.data.datasource import read_events
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.preproc import Expression, load_preproc, parse_preproc
from mlaas4hep.data.rootio import inspect_inputs, open_tree, read_table
from mlaas4hep.spec import parse_spec

HZZ = "uproot-HZZ.root"

#: MLaaS4HEP's own example, with HZZ branch names.
PREPROC = {
    "new_branch": {
        "Jet_Pt": {
            "def": "sqrt(Jet_Px**2 + Jet_Py**2)",
            "type": "jagged",
            "cut_1": ["Jet_Pt > 20", "all"],
            "remove": "False",
            "keys_to_remove": ["Jet_Px", "Jet_Py"],
        },
        "NJet_square": {"def": "NJet**2", "type": "flat", "cut": "1<=NJet_square<=9"},
    },
    "flat_cut": {"NMuon": {"cut": "0<NMuon<=2", "remove": "True"}},
    "jagged_cut": {"Muon_Iso": {"cut": ["Muon_Iso < 2", "any"], "remove": "False"}},
}


def expected_mask(arrays) -> np.ndarray:
    jet_pt = np.sqrt(arrays.Jet_Px**2 + arrays.Jet_Py**2)
    keep = ak.all(jet_pt > 20, axis=1) & (arrays.NJet**2 >= 1) & (arrays.NJet**2 <= 9)
    keep = keep & (arrays.NMuon > 0) & (arrays.NMuon <= 2) & ak.any(arrays.Muon_Iso < 2, axis=1)
    return ak.to_numpy(keep)


def test_mlaas4hep_preproc_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "preproc.json"
    path.write_text(json.dumps(PREPROC))
    preproc = load_preproc(str(path))
    assert [(b.name, b.kind) for b in preproc.new_branches] == [
        ("Jet_Pt", "jagged"),
        ("NJet_square", "flat"),
    ]
    assert [(c.expression.text, c.mode) for c in preproc.cuts] == [
        ("Jet_Pt > 20", "all"),
        ("1<=NJet_square<=9", "flat"),
        ("0<NMuon<=2", "flat"),
        ("Muon_Iso < 2", "any"),
    ]
    assert preproc.removed == {"Jet_Px", "Jet_Py", "NMuon"}
    assert preproc.inputs() == ["Jet_Px", "Jet_Py", "NJet", "NMuon", "Muon_Iso"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os')", "calls '__import__', not allowed"),
        ("open('x').read()", r"""calls "open\('x'\)\.read", not allowed"""),
        ("Jet_Px.size", "uses Attribute, not allowed"),
        ("[x for x in Jet_Px]", "uses ListComp, not allowed"),
        ("log(Jet_Px", "cannot parse"),
    ],
)
def test_unsafe_or_broken_expressions_are_refused(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Expression(text, "preproc: new_branch.x")


def test_bad_preproc_entries_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"new_branch\.y: needs a 'def'"):
        parse_preproc({"new_branch": {"y": {"type": "flat"}}})
    with pytest.raises(DataError, match=r"jagged_cut\.J\.cut: a jagged cut is \[condition"):
        parse_preproc({"jagged_cut": {"J": {"cut": "J > 1"}}})
    with pytest.raises(DataError, match="unknown sections hist"):
        parse_preproc({"hist": {}})
    with pytest.raises(DataError, match=r"nowhere\.json: preprocessing file not found"):
        load_preproc(str(tmp_path / "nowhere.json"))


def test_preproc_applied_while_reading_matches_awkward(shared_data: Path) -> None:
    path = shared_data / HZZ
    spec = parse_spec(
        {"files": [{"path": str(path), "label": 1}], "branch": "events", "preproc": PREPROC}
    )
    summary = inspect_inputs(spec)
    names = [b.name for b in summary.features]
    assert "Jet_Pt" in names and "NJet_square" in names
    assert not {"Jet_Px", "Jet_Py", "NMuon"} & set(names)
    assert {b.name for b in summary.preproc_inputs} == {"Jet_Px", "Jet_Py", "NMuon"}
    tree = open_tree(str(path), "events")
    table = read_table(tree, summary.reads, 0, 2421, HZZ, summary.preproc, summary.columns)
    arrays = uproot.open(path)["events"].arrays()
    keep = expected_mask(arrays)
    assert 0 < table.num_rows == keep.sum() < 2421
    jet_pt = np.sqrt(arrays.Jet_Px**2 + arrays.Jet_Py**2)[keep]
    got = ak.from_arrow(table.column("Jet_Pt"))
    assert ak.all(ak.num(got) == ak.num(jet_pt))
    np.testing.assert_allclose(ak.flatten(got), ak.flatten(jet_pt), rtol=1e-6)
    np.testing.assert_array_equal(table.column("NJet_square").to_numpy(), arrays.NJet[keep] ** 2)
    assert table.column_names == names


def test_preproc_naming_an_unknown_branch_is_refused(shared_data: Path) -> None:
    preproc = {"flat_cut": {"nLeptons": {"cut": "0<=nLeptons<=2"}}}
    spec = parse_spec(
        {"files": [{"path": str(shared_data / HZZ), "label": 1}], "branch": "events",
         "preproc": preproc}
    )  # fmt: skip
    with pytest.raises(DataError, match=r"branch used by preprocessing 'nLeptons' not found"):
        inspect_inputs(spec)


def test_new_branch_of_the_wrong_type_is_named(shared_data: Path) -> None:
    preproc = {"new_branch": {"x": {"def": "Jet_Px * 2", "type": "flat"}}}
    spec = parse_spec(
        {"files": [{"path": str(shared_data / HZZ), "label": 1}], "branch": "events",
         "preproc": preproc}
    )  # fmt: skip
    summary = inspect_inputs(spec)
    tree = open_tree(str(shared_data / HZZ), "events")
    with pytest.raises(DataError, match=r"new_branch\.x: 'Jet_Px \* 2' gives jagged values"):
        read_table(tree, summary.reads, 0, 100, HZZ, summary.preproc, summary.columns)


@pytest.mark.ray
def test_read_events_applies_preproc_in_the_read_tasks(ray_cluster, shared_data: Path) -> None:
    path = shared_data / HZZ
    spec = one_file_spec(path, "events", preproc=PREPROC, chunk_size=600)
    table = pa.concat_tables(_get(read_events(spec).to_arrow_refs()))
    keep = expected_mask(uproot.open(path)["events"].arrays())
    assert table.num_rows == keep.sum()
    assert "Jet_Pt" in table.column_names and "Jet_Px" not in table.column_names


def _get(refs):
    import ray

    return ray.get(refs)
