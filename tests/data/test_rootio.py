"""Opening ROOT files, classifying branches and checking a spec's inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import uproot
from root_helpers import damaged_copy

from mlaas4hep.data.errors import DataError
from mlaas4hep.data.rootio import inspect_inputs, open_tree, read_table, tree_branches
from mlaas4hep.spec import parse_spec

HZZ = "uproot-HZZ.root"


def make_spec(*paths: str | Path, tree: str = "events", **extra):
    files = [{"path": str(p), "label": i % 2} for i, p in enumerate(paths)]
    return parse_spec({"files": files, "branch": tree, **extra})


# --- opening -----------------------------------------------------------------------------


def test_open_tree_returns_the_tree(shared_data: Path) -> None:
    tree = open_tree(str(shared_data / HZZ), "events")
    assert tree.num_entries == 2421


def test_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.root"
    with pytest.raises(DataError, match=r"nowhere\.root: file not found"):
        open_tree(str(path), "events")


def test_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder, not a ROOT file"):
        open_tree(str(tmp_path), "events")


def test_text_file_is_refused_as_not_root(tmp_path: Path) -> None:
    path = tmp_path / "notes.root"
    path.write_text("these are not the events you are looking for\n" * 50)
    with pytest.raises(DataError, match=r"notes\.root: not a readable ROOT file"):
        open_tree(str(path), "events")


@pytest.mark.parametrize("keep", [100, 20_000, 200_000])
def test_truncated_file_is_refused(shared_data: Path, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "truncated.root"
    path.write_bytes((shared_data / HZZ).read_bytes()[:keep])
    with pytest.raises(DataError, match=r"truncated\.root: not a readable ROOT file"):
        open_tree(str(path), "events")


def test_missing_tree_lists_the_trees_of_the_file(shared_data: Path) -> None:
    with pytest.raises(DataError, match=r"no tree 'Events' \(trees in the file: events\)"):
        open_tree(str(shared_data / HZZ), "Events")


def test_corrupt_basket_names_file_branch_and_entries(shared_data: Path, tmp_path: Path) -> None:
    path = damaged_copy(shared_data / HZZ, "events", "Jet_Px", tmp_path / "corrupt.root")
    tree = open_tree(str(path), "events")
    branches = [b for b in tree_branches(tree) if b.name in ("NJet", "Jet_Px")]
    with pytest.raises(DataError, match=r"corrupt\.root.*branch 'Jet_Px' entries 0-100 failed"):
        read_table(tree, branches, 0, 100, str(path))


# --- branch kinds ------------------------------------------------------------------------


def test_every_dtype_fixed_array_and_string_is_classified(shared_data: Path) -> None:
    tree = open_tree(str(shared_data / "uproot-sample-6.20.04-zlib.root"), "sample")
    kinds = {b.name: b for b in tree_branches(tree)}
    for name, dtype in [("b", "bool"), ("i1", "int8"), ("u2", "uint16"), ("u8", "uint64")]:
        assert (kinds[name].kind, kinds[name].dtype) == ("flat", dtype)
    assert (kinds["f4"].kind, kinds["f8"].dtype) == ("flat", "float64")
    assert (kinds["af4"].kind, kinds["af4"].size) == ("jagged", 3)
    assert (kinds["Ai8"].kind, kinds["Ai8"].size, kinds["Ai8"].dtype) == ("jagged", 0, "int64")
    assert (kinds["str"].kind, kinds["str"].reason) == ("unsupported", "string")


def test_nested_split_branches_are_leaves_under_full_paths(shared_data: Path) -> None:
    tree = open_tree(str(shared_data / "uproot-small-evnt-tree-fullsplit.root"), "tree")
    kinds = {b.name: b for b in tree_branches(tree)}
    assert "evt" not in kinds and "evt/P3" not in kinds
    assert kinds["evt/P3/P3.Px"].kind == "flat"
    assert kinds["evt/StlVecF64"].kind == "jagged"
    assert kinds["evt/ArrayI16[10]"].size == 10
    assert kinds["evt/StlVecStr"].reason == "list of strings"


def test_doubly_jagged_branch_is_unsupported(shared_data: Path) -> None:
    tree = open_tree(str(shared_data / "uproot-vectorVectorDouble.root"), "t")
    (branch,) = tree_branches(tree)
    assert branch.kind == "unsupported"
    assert "doubly-jagged" in branch.reason


# --- inspect_inputs ----------------------------------------------------------------------


def test_inspect_hzz_finds_flat_and_jagged_features(shared_data: Path) -> None:
    summary = inspect_inputs(make_spec(shared_data / HZZ))
    assert len(summary.flat_keys) == 28 and len(summary.jagged_keys) == 23
    tree = uproot.open(shared_data / HZZ)["events"]
    assert [b.name for b in summary.features if b.kind == "flat"] == [
        b.name
        for b in tree.branches
        if b.typename.endswith("_t") or b.typename in ("float", "bool")
    ]
    (info,) = summary.files
    assert (info.entries, info.label, info.clusters[0], info.clusters[-1]) == (2421, 0, 0, 2421)
    assert info.bytes_per_entry > 0
    assert summary.skipped == {}
    assert str(summary) == "tree 'events': 1 files, 2421 entries, 28 flat + 23 jagged features"


def test_inspect_skips_strings_with_one_warning(shared_data: Path) -> None:
    with pytest.warns(UserWarning, match=r"skipping branches that cannot be features: Type"):
        summary = inspect_inputs(make_spec(shared_data / "uproot-Zmumu.root"))
    assert summary.skipped == {"Type": "string"}
    assert len(summary.flat_keys) == 19


def test_inspect_refuses_empty_tree(shared_data: Path) -> None:
    spec = make_spec(shared_data / "uproot-empty.root", tree="tree", exclude_branches=["z"])
    with pytest.raises(DataError, match=r"uproot-empty\.root: tree 'tree' has no entries"):
        inspect_inputs(spec)


def test_inspect_refuses_doubly_jagged_selected_by_name(shared_data: Path) -> None:
    spec = make_spec(
        shared_data / "uproot-vectorVectorDouble.root", tree="t", selected_branches="x"
    )
    with pytest.raises(DataError, match=r"selected branch 'x' cannot be a feature: doubly-jagged"):
        inspect_inputs(spec)


def test_inspect_refuses_file_with_only_doubly_jagged_branches(shared_data: Path) -> None:
    spec = make_spec(shared_data / "uproot-vectorVectorDouble.root", tree="t")
    with pytest.raises(DataError, match=r"no usable feature branches; x is doubly-jagged"):
        inspect_inputs(spec)


def test_inspect_refuses_string_selected_by_name(shared_data: Path) -> None:
    spec = make_spec(shared_data / "uproot-Zmumu.root", selected_branches=["M", "Type"])
    with pytest.raises(DataError, match=r"selected branch 'Type' cannot be a feature: string"):
        inspect_inputs(spec)


def test_missing_selected_branch_suggests_close_names(shared_data: Path) -> None:
    spec = make_spec(shared_data / HZZ, selected_branches=["Jet_PX"])
    with pytest.raises(
        DataError, match=r"selected branch 'Jet_PX' not found; did you mean Jet_Px\?"
    ):
        inspect_inputs(spec)


def test_missing_identifier_branch_is_named(shared_data: Path) -> None:
    spec = make_spec(shared_data / HZZ, identifier=["run", "event"])
    with pytest.raises(
        DataError, match=r"uproot-HZZ\.root: tree 'events': identifier branch 'run'"
    ):
        inspect_inputs(spec)


def test_missing_label_branch_is_named(shared_data: Path) -> None:
    spec = parse_spec(
        {"files": [str(shared_data / HZZ)], "branch": "events", "label_branch": "isSignal"}
    )
    with pytest.raises(DataError, match=r"label branch 'isSignal' not found"):
        inspect_inputs(spec)


def test_jagged_label_branch_is_refused(shared_data: Path) -> None:
    spec = parse_spec(
        {"files": [str(shared_data / HZZ)], "branch": "events", "label_branch": "Jet_ID"}
    )
    with pytest.raises(DataError, match=r"label branch 'Jet_ID' must hold one number per event"):
        inspect_inputs(spec)


def test_missing_file_among_several_is_named(shared_data: Path, tmp_path: Path) -> None:
    spec = make_spec(shared_data / HZZ, tmp_path / "gone.root")
    with pytest.raises(DataError, match=r"gone\.root: file not found"):
        inspect_inputs(spec)


def test_file_lacking_a_feature_of_the_first_file_is_named(shared_data: Path) -> None:
    spec = make_spec(shared_data / HZZ, shared_data / "uproot-Zmumu.root")
    with pytest.raises(DataError, match=r"uproot-Zmumu\.root: tree 'events': branch 'NJet'"):
        inspect_inputs(spec)


def test_selection_wildcards_exclusion_and_roles(shared_data: Path) -> None:
    spec = make_spec(
        shared_data / HZZ,
        selected_branches=["Muon_*", "MET_px", "Jet_btag"],
        exclude_branches=["Muon_Iso", "Jet_btag"],
        identifier=["NPrimaryVertices"],
    )
    summary = inspect_inputs(spec)
    # Muon_Iso is excluded (selected only by a wildcard); Jet_btag is named, so it stays.
    assert [b.name for b in summary.features] == [
        "Jet_btag", "Muon_Px", "Muon_Py", "Muon_Pz", "Muon_E", "Muon_Charge", "MET_px",
    ]  # fmt: skip
    assert [b.name for b in summary.identifiers] == ["NPrimaryVertices"]


def test_selecting_a_parent_selects_its_sub_branches(shared_data: Path) -> None:
    spec = make_spec(
        shared_data / "uproot-small-evnt-tree-fullsplit.root",
        tree="tree",
        selected_branches=["evt/P3"],
    )
    assert [b.name for b in inspect_inputs(spec).features] == [
        "evt/P3/P3.Px", "evt/P3/P3.Py", "evt/P3/P3.Pz",
    ]  # fmt: skip


def test_branch_named_like_a_reserved_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labelled.root"
    with uproot.recreate(path) as file:
        file.mktree("Events", {"x": np.float32, "label": np.int32})
        file["Events"].extend({"x": np.ones(3, "f4"), "label": np.zeros(3, "i4")})
    with pytest.raises(DataError, match=r"branch 'label' has the name of a column"):
        inspect_inputs(make_spec(path, tree="Events"))
    spec = parse_spec({"files": [str(path)], "branch": "Events", "label_branch": "label"})
    assert [b.name for b in inspect_inputs(spec).features] == ["x"]


def test_redirector_resolves_logical_names(shared_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "store" / "data"
    store.mkdir(parents=True)
    shutil.copy(shared_data / HZZ, store / HZZ)
    spec = make_spec(f"/store/data/{HZZ}", redirector=f"file://{tmp_path}")
    (info,) = inspect_inputs(spec).files
    assert info.path == f"file://{tmp_path}//store/data/{HZZ}"
    assert info.entries == 2421
