"""Demo data: NanoAOD-like signal and background files a model can tell apart."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from mlaas4hep.cli.demo import DEMO_TREE, write_demo_data
from mlaas4hep.data.features import block_specs, merge_specs
from mlaas4hep.data.flatten import flatten_columns, to_model_input

BRANCH_TYPES = {
    "run": "uint32_t",
    "luminosityBlock": "uint32_t",
    "event": "uint64_t",
    "MET_pt": "float",
    "MET_phi": "float",
    "HT": "float",
    "nJet": "int32_t",
    "Jet_pt": "float[]",
    "Jet_eta": "float[]",
    "Jet_phi": "float[]",
    "Jet_btag": "float[]",
    "nMuon": "int32_t",
    "Muon_pt": "float[]",
    "Muon_eta": "float[]",
    "Muon_phi": "float[]",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), events=2500, seed=3)


def test_demo_files_are_ttrees_with_nanoaod_like_branches(demo) -> None:
    for path in demo:
        tree = uproot.open(path)[DEMO_TREE]
        assert isinstance(tree, uproot.TTree)
        assert {b.name: b.typename for b in tree.branches} == BRANCH_TYPES
        assert tree.num_entries == 2500
        assert len(tree.common_entry_offsets()) > 2  # several clusters
        arrays = tree.arrays(["nJet", "Jet_pt", "HT"])
        assert ak.all(ak.num(arrays.Jet_pt) == arrays.nJet)
        np.testing.assert_allclose(ak.sum(arrays.Jet_pt, axis=1), arrays.HT, rtol=1e-5)


def test_demo_data_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    first = write_demo_data(tmp_path / "a", events=300, seed=11)
    again = write_demo_data(tmp_path / "b", events=300, seed=11)
    other = write_demo_data(tmp_path / "c", events=300, seed=12)

    def read(path: Path) -> dict:
        return uproot.open(path)[DEMO_TREE].arrays(library="ak").to_list()

    assert read(first[0]) == read(again[0]) and read(first[1]) == read(again[1])
    assert read(first[0]) != read(other[0])


def test_event_numbers_do_not_repeat_across_files(demo) -> None:
    numbers = [uproot.open(p)[DEMO_TREE]["event"].array(library="np") for p in demo]
    assert len(np.unique(np.concatenate(numbers))) == 5000


def test_a_simple_model_separates_signal_from_background(demo) -> None:
    names = [n for n in BRANCH_TYPES if n not in ("run", "luminosityBlock", "event")]
    blocks = [uproot.open(p)[DEMO_TREE].arrays(names, how=dict) for p in demo]
    specs = merge_specs(block_specs(blocks[0]), block_specs(blocks[1])).finalize()
    x = np.vstack([to_model_input(flatten_columns(b, specs)[0]) for b in blocks])
    y = np.repeat([1, 0], 2500)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    model = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    assert 0.8 < auc < 0.97


def test_demo_refuses_zero_events(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="events must be at least 1"):
        write_demo_data(tmp_path, events=0)
