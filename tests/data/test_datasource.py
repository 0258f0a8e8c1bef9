"""Reading ROOT files into Ray Data: task planning, columns, labels, nevts, every test file."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pytest
import ray.data
import uproot
from root_helpers import damaged_copy, one_file_spec

from mlaas4hep.cli.demo import write_demo_data
from mlaas4hep.data.datasource import (
    RootDatasource,
    _OpenTrees,
    events_per_file,
    plan_ranges,
    read_events,
    read_events_once,
)
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.rootio import inspect_inputs
from mlaas4hep.spec import parse_spec

HZZ = "uproot-HZZ.root"


def test_ranges_follow_clusters_and_cover_every_entry_once() -> None:
    clusters = [0, 1000, 2000, 3000, 4000]
    assert plan_ranges(clusters, 4000, 2500) == [(0, 2000), (2000, 4000)]
    assert plan_ranges(clusters, 4000, 1500) == [
        (0, 1000),
        (1000, 2000),
        (2000, 3000),
        (3000, 4000),
    ]
    assert plan_ranges(clusters, 2500, 10_000) == [(0, 2500)]
    assert plan_ranges([0, 2421], 2421, 1000) == [(0, 807), (807, 1614), (1614, 2421)]
    for chunk in (1, 7, 333, 999, 1001, 5000):
        ranges = plan_ranges([0, 10, 700, 1500, 4000], 3333, chunk)
        assert ranges[0][0] == 0 and ranges[-1][1] == 3333
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(0 < stop - start <= chunk for start, stop in ranges)


def test_nevts_is_shared_in_proportion_to_file_sizes() -> None:
    assert events_per_file([2421, 2304], -1) == [2421, 2304]
    assert events_per_file([2421, 2304], 1000) == [512, 488]
    assert events_per_file([100_000, 10], 50) == [50, 1]  # every file gives at least one
    assert events_per_file([30, 10], 10_000) == [30, 10]  # never more than a file holds


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), events=3000, seed=7)


def demo_spec(demo_files, **extra):
    signal, background = demo_files
    files = [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}]
    return parse_spec({"files": files, **extra})


def test_read_tasks_are_cluster_aligned_with_int_sizes(demo_files) -> None:
    source = RootDatasource(inspect_inputs(demo_spec(demo_files)), chunk_size=2500)
    tasks = source.get_read_tasks(4, per_task_row_limit=None, data_context=None, extra=True)
    assert [t.metadata.num_rows for t in tasks] == [2000, 2000, 1000, 1000]
    assert all(type(t.metadata.size_bytes) is int and t.metadata.size_bytes > 0 for t in tasks)
    assert source.estimate_inmemory_data_size() == sum(t.metadata.size_bytes for t in tasks)
    assert tasks[1].metadata.input_files == (str(demo_files[1]),)


def test_without_chunk_size_read_tasks_hold_about_task_bytes_of_whole_clusters(
    demo_files, monkeypatch
) -> None:
    from mlaas4hep.data import datasource

    summary = inspect_inputs(demo_spec(demo_files))
    per_entry = min(f.bytes_per_entry for f in summary.files)  # 145 and 116 bytes
    monkeypatch.setattr(datasource, "TASK_BYTES", 2500 * per_entry)  # 2,000 to 2,500 events
    rows = [t.metadata.num_rows for t in RootDatasource(summary).get_read_tasks(1)]
    assert rows == [2000, 2000, 1000, 1000]  # clusters of 1,000: whole ones up to the size
    monkeypatch.setattr(datasource, "TASK_BYTES", 10**12)  # a narrow tree: one task a file
    assert [t.metadata.num_rows for t in RootDatasource(summary).get_read_tasks(1)] == [3000] * 2
    chunked = RootDatasource(summary, chunk_size=1000).get_read_tasks(1)  # the spec's size wins
    assert [t.metadata.num_rows for t in chunked] == [1000] * 6


def test_per_chunk_training_chunks_default_to_mlaas4hep_chunk_size(demo_files) -> None:
    assert demo_spec(demo_files).chunk_events == 10_000
    assert demo_spec(demo_files, chunk_size=600).chunk_events == 600


def test_read_task_yields_features_identifiers_label_and_file_index(demo_files) -> None:
    spec = demo_spec(demo_files, identifier="run,event,luminosityBlock")
    source = RootDatasource(inspect_inputs(spec), chunk_size=1000)
    (table,) = list(source.get_read_tasks(1)[3]())  # background, entries 1000-2000
    assert table.column_names == [
        "MET_pt", "MET_phi", "HT", "nJet", "Jet_pt", "Jet_eta", "Jet_phi", "Jet_btag",
        "nMuon", "Muon_pt", "Muon_eta", "Muon_phi",
        "run", "event", "luminosityBlock", "label", "file_index",
    ]  # fmt: skip
    assert table.schema.field("Jet_pt").type == pa.list_(pa.float32())
    assert table.schema.field("event").type == pa.uint64()
    tree = uproot.open(demo_files[1])["Events"]
    expected = tree.arrays(["Jet_pt", "event"], entry_start=1000, entry_stop=2000)
    assert table.column("Jet_pt").to_pylist() == expected["Jet_pt"].to_list()
    assert table.column("event").to_pylist() == expected["event"].to_list()
    assert set(table.column("label").to_pylist()) == {0}
    assert set(table.column("file_index").to_pylist()) == {1}


@pytest.mark.ray
def test_read_events_returns_every_event_with_its_file_label(ray_cluster, demo_files) -> None:
    ds = read_events(demo_spec(demo_files, chunk_size=700, identifier=["event"]))
    rows = ds.select_columns(["event", "label", "nJet", "Jet_pt"]).take_all()
    assert len(rows) == 6000
    by_event = {int(r["event"]): r for r in rows}
    signal = uproot.open(demo_files[0])["Events"].arrays(["event", "nJet", "Jet_pt"])
    for event, n_jet, jets in zip(
        signal["event"].to_list(), signal["nJet"].to_list(), signal["Jet_pt"].to_list(), strict=True
    ):
        row = by_event[event]
        assert (row["label"], row["nJet"]) == (1, n_jet)
        np.testing.assert_array_equal(row["Jet_pt"], np.asarray(jets, dtype=np.float32))
    assert sum(r["label"] for r in rows) == 3000


@pytest.mark.ray
def test_nevts_reads_a_proportional_share_of_each_file(ray_cluster, tmp_path: Path) -> None:
    files = []
    for label, size in ((1, 300), (0, 100)):
        path = tmp_path / f"sample{label}.root"
        with uproot.recreate(path) as file:
            file.mktree("Events", {"x": np.float64})
            file["Events"].extend({"x": np.arange(size, dtype=np.float64)})
        files.append({"path": str(path), "label": label})
    spec = parse_spec({"files": files, "nevts": 200})
    table = read_events(spec).to_pandas()
    assert table["label"].value_counts().to_dict() == {1: 150, 0: 50}
    assert sorted(table[table["label"] == 0]["x"]) == list(range(50))  # from the file's start


@pytest.mark.ray
def test_label_branch_gives_each_events_label(ray_cluster, shared_data: Path) -> None:
    path = shared_data / HZZ
    spec = parse_spec({"files": [str(path)], "branch": "events", "label_branch": "triggerIsoMu24"})
    ds = read_events(spec)
    assert "triggerIsoMu24" not in ds.columns()
    labels = ds.select_columns(["label"]).to_pandas()["label"]
    expected = uproot.open(path)["events"]["triggerIsoMu24"].array(library="np").astype(int)
    assert str(labels.dtype).startswith("int64")
    assert sorted(labels.tolist()) == sorted(expected.tolist())
    assert labels.sum() == expected.sum() > 0


def _get(refs):
    import ray

    return ray.get(refs)


READABLE = [
    ("nanoAOD_2015_CMS_Open_Data_ttbar.root", "Events", 200),
    (HZZ, "events", 2421),
    ("uproot-HZZ-zstd.root", "events", 2421),
    ("uproot-HZZ-lzma.root", "events", 2421),
    ("uproot-Zmumu.root", "events", 2304),
    ("uproot-sample-6.20.04-zlib.root", "sample", 30),
    ("uproot-small-flat-tree.root", "tree", 100),
    ("uproot-small-evnt-tree-fullsplit.root", "tree", 100),
]


@pytest.fixture
def ordered(ray_cluster):
    """Blocks come out in file order (Ray Data otherwise yields them as tasks finish)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    yield
    options.preserve_order = before


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:.*skipping branches that cannot be features")
@pytest.mark.parametrize(("name", "tree", "entries"), READABLE)
def test_every_readable_test_file_reads_like_uproot(
    ordered, shared_data: Path, name: str, tree: str, entries: int
) -> None:
    path = shared_data / name
    spec = parse_spec(
        {"files": [{"path": str(path), "label": 0}], "branch": tree, "chunk_size": 700}
    )
    summary = inspect_inputs(spec)
    table = pa.concat_tables(_get(read_events(spec, summary).to_arrow_refs()))
    assert table.num_rows == entries
    names = [b.name for b in summary.features]
    expected = uproot.open(path)[tree].arrays(names, library="ak", how=dict)
    for branch in summary.features:
        got = ak.from_arrow(table.column(branch.name))
        want = expected[branch.name]
        if branch.kind == "jagged":
            np.testing.assert_array_equal(ak.num(got), ak.num(want), err_msg=branch.name)
            got, want = ak.flatten(got), ak.flatten(want)
        got, want = ak.to_numpy(got), ak.to_numpy(want)
        assert got.dtype == (np.float32 if want.dtype == np.float16 else want.dtype), branch.name
        np.testing.assert_array_equal(got, want, err_msg=branch.name)  # NaNs compare equal


REFUSED = [
    ("uproot-empty.root", "tree", r"uproot-empty\.root: tree 'tree' has no entries"),
    ("uproot-vectorVectorDouble.root", "t", r"no usable feature branches; x is doubly-jagged"),
]


@pytest.mark.filterwarnings("ignore:.*skipping branches that cannot be features")
@pytest.mark.parametrize(("name", "tree", "message"), REFUSED)
def test_unusable_test_files_are_refused_clearly(
    shared_data: Path, name: str, tree: str, message: str
) -> None:
    spec = parse_spec({"files": [{"path": str(shared_data / name), "label": 0}], "branch": tree})
    with pytest.raises(DataError, match=message):
        read_events(spec)


@pytest.mark.ray
def test_corrupt_basket_fails_the_read_naming_file_and_branch(
    ray_cluster, shared_data: Path, tmp_path: Path
) -> None:
    path = damaged_copy(shared_data / HZZ, "events", "Muon_Pz", tmp_path / "damaged.root")
    spec = one_file_spec(path, "events")
    with pytest.raises(DataError, match=r"damaged\.root: tree 'events': reading branch 'Muon_Pz'"):
        read_events(spec).materialize()


def test_read_tasks_reuse_an_open_file_until_it_changes(tmp_path: Path, shared_data: Path) -> None:
    path = tmp_path / "hzz.root"
    shutil.copy(shared_data / "uproot-HZZ.root", path)
    trees = _OpenTrees(size=1)
    _, first = trees.get(str(path), "events", 10, "auto")
    assert trees.get(str(path), "events", 10, "auto")[1] is first
    path.write_bytes(path.read_bytes())  # same content, new modification time
    os.utime(path, ns=(0, 0))
    assert trees.get(str(path), "events", 10, "auto")[1] is not first
    trees.drop(trees.get(str(path), "events", 10, "auto")[0])
    assert trees.trees == {}


def test_events_that_fit_are_read_once_into_the_object_store(
    ray_cluster, shared_data: Path, monkeypatch
) -> None:
    from ray.data.dataset import MaterializedDataset

    from mlaas4hep.data import datasource

    def once(mode: str) -> ray.data.Dataset:
        return read_events_once(one_file_spec(shared_data / HZZ, "events", cache_events=mode))

    cached = once("auto")
    assert isinstance(cached, MaterializedDataset) and cached.count() == 2421
    # read without Ray Data's per-operator reservation; what derives from it has it again
    assert cached.context.op_resource_reservation_enabled
    assert not isinstance(once("never"), MaterializedDataset)
    monkeypatch.setattr(datasource, "CACHE_FRACTION", 0.0)  # nothing fits: stream every pass
    assert not isinstance(once("auto"), MaterializedDataset)
    assert isinstance(once("always"), MaterializedDataset)


def test_cache_events_accepts_only_its_three_modes(shared_data: Path) -> None:
    with pytest.raises(ValueError, match="cache_events"):
        one_file_spec(shared_data / HZZ, "events", cache_events="sometimes")


def test_processes_that_read_root_files_refresh_ray_data_limits_promptly() -> None:
    # Ray Data 2.60 starts each execution with zero limits (one task at a time) until
    # its first refresh; a Ray upgrade that moves the setting must be noticed here.
    from ray.data._internal.execution.resource_manager import ResourceManager

    from mlaas4hep.data.execution import LIMITS_REFRESH_S

    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S
