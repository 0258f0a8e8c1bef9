"""An XRootD proxy-cache (pss + pfc) in front of an origin, both real ``xrootd`` on loopback.

The proxy runs with ``k8s/base/xcache/xcache.cfg``, the file the Kubernetes ConfigMap is
generated from.
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
import uproot
from xrootd_fixtures import XCACHE_CONFIG, run_xcache, run_xrootd

from mlaas4hep.data.rootio import inspect_inputs, open_tree
from mlaas4hep.spec import parse_spec

pytestmark = pytest.mark.xrootd

HZZ = "uproot-HZZ.root"
BRANCHES = ["Muon_Px", "Jet_E", "MET_px"]


def _read(url: str) -> list:
    """The test branches of ``url`` read with the platform's reader; the file is closed after."""
    tree = open_tree(url, "events", timeout=10)
    try:
        return tree.arrays(BRANCHES).to_list()
    finally:
        tree.file.close()


def _cache_record(cinfo: Path) -> str:
    """What ``xrdpfc_print`` says of a cached file: its state and access records."""
    tool = shutil.which("xrdpfc_print")
    if tool is None:
        pytest.skip("xrdpfc_print is not installed")
    return subprocess.run([tool, str(cinfo)], capture_output=True, text=True, check=True).stdout


def test_second_read_through_the_proxy_is_served_from_its_cache(shared_data: Path) -> None:
    expected = uproot.open(shared_data / HZZ)["events"].arrays(BRANCHES).to_list()
    with ExitStack() as stack:
        with run_xrootd() as origin:
            origin.add(shared_data / HZZ)
            xcache = stack.enter_context(run_xcache(origin.url))
            url = f"{xcache.url}/{HZZ}"
            assert _read(url) == expected
        # The origin is stopped and its files are gone: only the cache can answer now.
        cinfo = xcache.cache / f"{HZZ}.cinfo"
        assert (xcache.cache / HZZ).is_file() and cinfo.is_file()
        assert _read(url) == expected
        record = _cache_record(cinfo)
    assert "state complete" in record
    assert "N_acc_total=2" in record


def test_proxy_config_takes_its_site_settings_from_the_environment() -> None:
    text = XCACHE_CONFIG.read_text()
    for variable in ("XCACHE_ORIGIN", "XCACHE_DIR", "XCACHE_ADMIN_DIR", "XCACHE_ALLOW_HOSTS"):
        assert f"${variable}" in text
    directives = {line.split()[0] for line in text.splitlines() if line and line[0] != "#"}
    assert {"ofs.osslib", "pss.origin", "pss.cachelib", "oss.localroot"} <= directives


def test_store_names_are_read_through_the_platform_redirector(
    shared_data: Path, monkeypatch
) -> None:
    with run_xrootd() as origin, run_xcache(origin.url) as xcache:
        store = origin.folder / "store" / "mc"
        store.mkdir(parents=True, mode=0o755)
        store.chmod(0o755)
        origin.add(shared_data / HZZ, f"store/mc/{HZZ}")
        monkeypatch.setenv("MLAAS4HEP_REDIRECTOR", xcache.url)
        spec = parse_spec({"files": [{"path": f"/store/mc/{HZZ}", "label": 1}], "branch": "events"})
        assert spec.resolved_paths() == [f"{xcache.url.rstrip('/')}//store/mc/{HZZ}"]
        summary = inspect_inputs(spec)
        assert summary.files[0].entries == 2421
        assert (xcache.cache / "store" / "mc" / f"{HZZ}.cinfo").is_file()
