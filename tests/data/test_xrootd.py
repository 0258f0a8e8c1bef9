"""Reading over root:// from a real XRootD server on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import uproot
from conftest import free_port
from root_helpers import damaged_copy, one_file_spec
from xrootd_fixtures import XRootDServer, run_xrootd

from mlaas4hep.data.datasource import read_events
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.rootio import inspect_inputs, open_options, open_tree
from mlaas4hep.spec import parse_spec

pytestmark = pytest.mark.xrootd

HZZ = "uproot-HZZ.root"


@pytest.fixture(scope="module")
def xrootd_server():
    with run_xrootd() as server:
        yield server


def test_root_urls_use_the_xrootd_handler() -> None:
    options = open_options("root://eospublic.cern.ch//eos/x.root", timeout=7)
    assert options["handler"] is uproot.source.xrootd.XRootDSource and options["timeout"] == 7
    assert "handler" not in open_options("/data/x.root")


def test_tree_over_root_matches_local_file(xrootd_server: XRootDServer, shared_data) -> None:
    url = xrootd_server.add(shared_data / HZZ)
    remote = open_tree(url, "events").arrays(["Jet_Px", "MET_px"])
    local = uproot.open(shared_data / HZZ)["events"].arrays(["Jet_Px", "MET_px"])
    assert remote.to_list() == local.to_list()


def test_fsspec_handler_reads_the_same_over_root(xrootd_server: XRootDServer, shared_data) -> None:
    url = xrootd_server.add(shared_data / HZZ)
    fast = open_tree(url, "events").arrays(["Muon_E"], entry_start=100, entry_stop=300)
    other = open_tree(url, "events", handler="fsspec")
    assert isinstance(other.file.source, uproot.source.fsspec.FSSpecSource)
    assert other.arrays(["Muon_E"], entry_start=100, entry_stop=300).to_list() == fast.to_list()


def test_inspect_over_root_matches_local(xrootd_server: XRootDServer, shared_data) -> None:
    url = xrootd_server.add(shared_data / HZZ)
    remote = inspect_inputs(parse_spec({"files": [{"path": url, "label": 1}], "branch": "events"}))
    local = inspect_inputs(
        parse_spec({"files": [{"path": str(shared_data / HZZ), "label": 1}], "branch": "events"})
    )
    assert remote.features == local.features
    assert remote.files[0].entries == 2421 and remote.files[0].path == url


def test_missing_file_on_the_server_is_named(xrootd_server: XRootDServer) -> None:
    url = f"{xrootd_server.url}/absent.root"
    with pytest.raises(DataError, match=r"absent\.root: file not found"):
        open_tree(url, "events")


def test_server_that_does_not_answer_is_refused_quickly() -> None:
    url = f"root://127.0.0.1:{free_port()}//data/x.root"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"x\.root: cannot reach the server"):
        open_tree(url, "events", timeout=5)
    assert time.monotonic() - start < 10


@pytest.mark.ray
def test_read_events_over_root_with_a_redirector(
    ray_cluster, xrootd_server: XRootDServer, shared_data: Path
) -> None:
    store = xrootd_server.folder / "store" / "mc"
    store.mkdir(parents=True)
    store.chmod(0o755)
    xrootd_server.add(shared_data / HZZ, f"store/mc/{HZZ}")
    spec = parse_spec(
        {
            "files": [{"path": f"/store/mc/{HZZ}", "label": 1}],
            "branch": "events",
            "redirector": xrootd_server.url,
            "chunk_size": 1000,
            "selected_branches": ["Muon_Px", "MET_px", "NMuon"],
        }
    )
    assert spec.resolved_paths() == [f"{xrootd_server.url.rstrip('/')}//store/mc/{HZZ}"]
    rows = pa.concat_tables(_get(read_events(spec).to_arrow_refs()))
    expected = uproot.open(shared_data / HZZ)["events"].arrays(["Muon_Px", "MET_px"])
    assert rows.num_rows == 2421
    assert sorted(rows.column("MET_px").to_pylist()) == sorted(expected["MET_px"].to_list())
    got = np.sort(np.concatenate([np.asarray(x) for x in rows.column("Muon_Px").to_pylist()]))
    want = np.sort(np.concatenate([np.asarray(x) for x in expected["Muon_Px"].to_list()]))
    np.testing.assert_array_equal(got, want)


def _get(refs):
    import ray

    return ray.get(refs)


@pytest.mark.ray
def test_damaged_remote_file_fails_naming_file_and_branch(
    ray_cluster, xrootd_server: XRootDServer, shared_data: Path, tmp_path: Path
) -> None:
    damaged = damaged_copy(shared_data / HZZ, "events", "Jet_E", tmp_path / "damaged.root")
    spec = one_file_spec(xrootd_server.add(damaged), "events", selected_branches=["Jet_E"])
    with pytest.raises(DataError, match=r"damaged\.root: tree 'events': reading branch 'Jet_E'"):
        read_events(spec).materialize()
