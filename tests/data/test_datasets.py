"""Data commands: `mlaas4hep specs` / `flatten` with MLaaS4HEP's inputs, specs reuse,
truncation counts, chunk order and shuffling, read metrics, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
from root_helpers import damaged_copy

from mlaas4hep.cli.demo import write_demo_data
from mlaas4hep.cli.main import main
from mlaas4hep.data.datasets import (
    fingerprint_changes,
    input_fingerprint,
    obtain_specs,
    specs_document,
)
from mlaas4hep.data.datasource import RootDatasource, read_events, shuffle_events
from mlaas4hep.data.features import FeatureSpecs, block_specs, merge_specs
from mlaas4hep.data.flatten import flatten_columns
from mlaas4hep.data.rootio import inspect_inputs
from mlaas4hep.spec import SpecError, parse_spec

HZZ = "uproot-HZZ.root"

#: MLaaS4HEP's model.py as its users wrote it: Keras 2 API, model(idim) returns it compiled.
KERAS2_MODEL = """\
from tensorflow import keras
from tensorflow.keras import layers


def model(idim):
    model = keras.Sequential()
    model.add(layers.Dense(32, activation='relu', input_shape=(idim,)))
    model.add(layers.Dropout(0.1))
    model.add(layers.Dense(1, activation='sigmoid'))
    model.compile(loss='binary_crossentropy', optimizer='adam', metrics=['accuracy'])
    return model
"""


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), events=1500, seed=3)


def mlaas4hep_inputs(folder: Path, files: list[Path], labels: list[int], **params) -> list[str]:
    """Write files.txt, labels.txt, params.json (with MLaaS4HEP's keys) and model.py."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "files.txt").write_text("".join(f"{p}\n" for p in files))
    (folder / "labels.txt").write_text("".join(f"{x}\n" for x in labels))
    defaults = {
        "nevts": -1,
        "chunk_size": 1000,
        "epochs": 5,
        "batch_size": 100,
        "branch": "Events",
        "identifier": "run,event,luminosityBlock",
        "selected_branches": "",
        "exclude_branches": "",
        "hist": "pdfs",
        "redirector": "root://cms-xrd-global.cern.ch",
        "verbose": 1,
    }
    (folder / "params.json").write_text(json.dumps(defaults | params))
    (folder / "model.py").write_text(KERAS2_MODEL)
    return [
        "--files", str(folder / "files.txt"), "--labels", str(folder / "labels.txt"),
        "--params", str(folder / "params.json"), "--model", str(folder / "model.py"),
    ]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- no Ray --------------------------------------------------------------------------


def test_truncated_values_are_counted_per_branch_and_summed_over_blocks() -> None:
    a = block_specs({"x": np.array([1.0, 2.0]), "j": [[1.0, 2.0, 3.0, 4.0], [5.0]]}, (), None, 2)
    b = block_specs({"x": np.array([3.0]), "j": [[1.0, 2.0, 3.0]]}, (), None, 2)
    assert a.truncated == {"j": 2} and b.truncated == {"j": 1}
    merged = merge_specs(a, b).finalize(2)
    assert merged.truncated == {"j": 3} and merged.jdim == {"j": 2}
    assert FeatureSpecs.from_dict(merged.to_dict()).truncated == {"j": 3}
    assert "truncated" not in block_specs({"j": [[1.0]]}).to_dict()


def test_chunks_interleave_files_in_proportion_and_blocks_order_is_a_seeded_permutation(
    tmp_path: Path,
) -> None:
    big = write_demo_data(tmp_path / "big", events=3000, seed=1)[0]
    small = write_demo_data(tmp_path / "small", events=1000, seed=2)[1]
    spec = parse_spec({"files": [{"path": str(big), "label": 1}, {"path": str(small), "label": 0}]})
    summary = inspect_inputs(spec)
    order = [c.file_index for c in RootDatasource(summary, chunk_size=500).chunks]
    assert order == [0, 0, 1, 0, 0, 0, 1, 0]  # 6 chunks of the big file, 2 of the small
    shuffled = RootDatasource(summary, chunk_size=500, order="blocks", seed=5).chunks
    again = RootDatasource(summary, chunk_size=500, order="blocks", seed=5).chunks
    plain = RootDatasource(summary, chunk_size=500).chunks
    assert (
        shuffled == again
        and shuffled != plain
        and sorted(shuffled, key=lambda c: (c.file_index, c.start))
        == sorted(plain, key=lambda c: (c.file_index, c.start))
    )


def test_fingerprint_names_the_input_that_changed(demo_files, tmp_path: Path) -> None:
    copy = tmp_path / "signal.root"
    shutil.copy(demo_files[0], copy)
    files = [{"path": str(copy), "label": 1}, {"path": str(demo_files[1]), "label": 0}]
    spec = parse_spec({"files": files})
    before = input_fingerprint(spec, inspect_inputs(spec))
    assert fingerprint_changes(before, input_fingerprint(spec, inspect_inputs(spec))) == []
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    capped = parse_spec({"files": files, "nevts": 100, "selected_branches": ["MET_pt", "Jet_pt"]})
    changes = fingerprint_changes(before, input_fingerprint(capped, inspect_inputs(capped)))
    assert changes[0] == f"file {copy} changed (mtime_ns)"
    assert any(c.startswith("branches changed ([") for c in changes)
    assert "nevts changed (-1 -> 100)" in changes


def test_spec_specs_file_from_the_same_inputs_is_reused_without_reading(
    demo_files, tmp_path: Path
) -> None:
    files = [{"path": str(demo_files[0]), "label": 1}, {"path": str(demo_files[1]), "label": 0}]
    path = tmp_path / "specs.json"
    spec = parse_spec({"files": files, "specs": str(path), "selected_branches": ["MET_pt"]})
    summary = inspect_inputs(spec)
    stored = block_specs({"MET_pt": np.array([1.0, 9.0])}).finalize()
    path.write_text(json.dumps(specs_document(stored, input_fingerprint(spec, summary))))
    result = obtain_specs(spec, summary, spec.specs)  # no Ray needed: nothing is read
    assert result.reused and result.why == f"{path} was computed from the same inputs"
    assert result.specs.maxv == {"MET_pt": 9.0} and result.document["inputs"]["nevts"] == -1


def test_spec_labels_must_match_files_one_to_one() -> None:
    spec = parse_spec({"files": ["a.root", "b.root"], "labels": [1, 0]})
    assert [(f.path, f.label) for f in spec.files] == [("a.root", 1), ("b.root", 0)]
    with pytest.raises(SpecError, match="labels: 1 labels for 2 files; give one label per file"):
        parse_spec({"files": ["a.root", "b.root"], "labels": [1]})


def test_labels_file_with_another_count_than_files_is_refused(
    demo_files, tmp_path: Path, capsys
) -> None:
    args = mlaas4hep_inputs(tmp_path, list(demo_files), [1])
    code, _, err = run_cli(capsys, "specs", *args, "--out", str(tmp_path / "specs.json"))
    assert code == 1
    assert err.strip() == (
        f"error: {tmp_path / 'labels.txt'}: 1 labels for 2 files in {tmp_path / 'files.txt'}; "
        "give one label per file"
    )


def test_preproc_that_does_not_parse_is_refused_at_submission(
    demo_files, platform_settings
) -> None:
    from mlaas4hep.auth.oidc import Principal
    from mlaas4hep.serve.apps.context import ApiContext
    from mlaas4hep.serve.apps.pipeline_api import SubmitRequest, _check_submission
    from mlaas4hep.serve.errors import ApiError

    files = [{"path": str(demo_files[0]), "label": 1}, {"path": str(demo_files[1]), "label": 0}]
    preproc = {"flat_cut": {"nJet": {"cut": "0 <= nJet <", "remove": "False"}}}
    request = SubmitRequest(spec={"files": files, "preproc": preproc})
    with pytest.raises(ApiError) as raised:
        alice = Principal(sub="alice", issuer="https://iam.example/")
        _check_submission(ApiContext.from_settings(platform_settings), request, alice, "r1")
    assert raised.value.status == 422
    assert raised.value.message.startswith("preproc: flat_cut.nJet.cut: cannot parse '0 <= nJet <'")


def test_truncated_file_is_refused_by_the_cli_without_traceback(
    shared_data: Path, tmp_path: Path, capsys
) -> None:
    truncated = tmp_path / "truncated.root"
    truncated.write_bytes((shared_data / HZZ).read_bytes()[:50_000])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"files: [{truncated}]\nlabels: [1]\nbranch: events\n")
    code, _, err = run_cli(capsys, "specs", str(spec), "--out", str(tmp_path / "specs.json"))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {truncated}: not a readable ROOT file")


# --- on the session's Ray cluster ------------------------------------------------------


@pytest.mark.ray
def test_specs_command_runs_mlaas4hep_inputs_and_reuses_specs_until_an_input_changes(
    ray_cluster, demo_files, tmp_path: Path, capsys
) -> None:
    signal = tmp_path / "signal.root"
    shutil.copy(demo_files[0], signal)
    args = mlaas4hep_inputs(tmp_path / "inputs", [signal, demo_files[1]], [1, 0])
    out = tmp_path / "specs.json"

    code, printed, _ = run_cli(capsys, "specs", *args, "--out", str(out))
    assert code == 0 and f"recomputing: {out} does not exist yet" in printed
    data = json.loads(out.read_text())
    assert {"jdim", "minv", "maxv", "fkeys", "jkeys", "nans", "events", "inputs"} <= set(data)
    assert data["events"] == {"total": 3000, str(signal): 1500, str(demo_files[1]): 1500}
    assert "event" not in data["fkeys"] and data["inputs"]["identifier"][1] == "event"
    arrays = [uproot.open(p)["Events"].arrays(["Jet_pt", "MET_pt"]) for p in demo_files]
    assert data["jdim"]["Jet_pt"] == max(int(ak.max(ak.num(a["Jet_pt"]))) for a in arrays)
    assert data["maxv"]["MET_pt"] == pytest.approx(max(float(np.max(a["MET_pt"])) for a in arrays))

    code, printed, _ = run_cli(capsys, "specs", *args, "--out", str(out))
    assert code == 0 and f"{out}: {out} was computed from the same inputs" in printed

    signal.write_bytes(signal.read_bytes())  # same content, new modification time
    os.utime(signal, ns=(time.time_ns(), time.time_ns() + 10**9))
    code, printed, _ = run_cli(capsys, "specs", *args, "--out", str(out))
    assert code == 0
    assert f"recomputing: {out} was computed from other inputs: file {signal} changed" in printed


@pytest.mark.ray
def test_flatten_command_writes_parquet_that_matches_uproot_flattening(
    ray_cluster, demo_files, tmp_path: Path, capsys
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"files: [{demo_files[0]}, {demo_files[1]}]\nlabels: [1, 0]\nchunk_size: 600\n"
        "identifier: [event]\nmax_jagged_dim: 2\nshuffle: global\n"
    )
    out = tmp_path / "flat"
    code, printed, err = run_cli(capsys, "flatten", str(spec_file), "--out", str(out))
    assert code == 0, err
    assert "wrote 3000 events x" in printed and "values beyond max_jagged_dim dropped" in printed

    specs = FeatureSpecs.load(out / "specs.json")
    names = json.loads((out / "features.json").read_text())["feature_names"]
    assert names == specs.feature_names() and specs.jdim["Jet_pt"] == 2
    table = pq.read_table(out / "events")
    assert table.column_names == ["features", "mask", "label", "event"]
    got = {int(e): i for i, e in enumerate(table.column("event").to_pylist())}
    features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    mask = np.stack(table.column("mask").to_numpy(zero_copy_only=False))
    truncated = 0
    for path, label in zip(demo_files, (1, 0), strict=True):
        arrays = uproot.open(path)["Events"].arrays(library="ak")
        columns = {k: arrays[k] for k in [*specs.fkeys, *specs.jkeys]}
        want, want_mask = flatten_columns(columns, specs)
        rows = [got[int(e)] for e in arrays["event"]]
        np.testing.assert_array_equal(features[rows], want)
        np.testing.assert_array_equal(mask[rows], want_mask)
        assert set(table.column("label").to_numpy()[rows]) == {label}
        counts = ak.to_numpy(ak.num(arrays["Jet_pt"]))
        truncated += int(np.maximum(counts - 2, 0).sum())
    assert specs.truncated["Jet_pt"] == truncated


@pytest.mark.ray
def test_corrupt_basket_fails_flatten_naming_file_and_branch(
    ray_cluster, shared_data: Path, tmp_path: Path, capsys
) -> None:
    damaged = damaged_copy(shared_data / HZZ, "events", "Jet_E", tmp_path / "damaged.root")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"files": [str(damaged)], "labels": [1], "branch": "events"}))
    code, _, err = run_cli(capsys, "flatten", str(spec), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {damaged}: tree 'events': reading branch 'Jet_E' entries")


@pytest.mark.ray
def test_global_shuffle_keeps_every_event_in_another_order(ray_cluster, demo_files) -> None:
    files = [{"path": str(p), "label": i} for i, p in enumerate(demo_files)]
    plain = parse_spec({"files": files, "identifier": ["event"], "chunk_size": 500})
    shuffled = plain.model_copy(update={"shuffle": "global"})
    assert shuffle_events(read_events(plain), plain) is not None
    before = [r["event"] for r in read_events(plain).select_columns(["event"]).take_all()]
    ds = shuffle_events(read_events(shuffled), shuffled)
    after = [r["event"] for r in ds.select_columns(["event"]).take_all()]
    assert sorted(after) == sorted(before) and after != before


def _metric_total(name: str, pipeline: str) -> float:
    import httpx
    import ray

    total = 0.0
    for node in (n for n in ray.nodes() if n["Alive"]):
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for line in httpx.get(url, timeout=10).text.splitlines():
            if name in line.split("{")[0] and f'pipeline="{pipeline}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.ray
def test_events_and_bytes_read_are_exported_per_pipeline(ray_cluster, shared_data: Path) -> None:
    spec = parse_spec(
        {"files": [{"path": str(shared_data / HZZ), "label": 1}], "branch": "events",
         "chunk_size": 1000, "selected_branches": ["MET_px", "Jet_Px"]}
    )  # fmt: skip
    pipeline = f"metrics-{time.time_ns()}"
    read_events(spec, pipeline=pipeline).materialize()
    deadline = time.monotonic() + 90
    while _metric_total("mlaas4hep_data_events_read", pipeline) < 2421:
        assert time.monotonic() < deadline, "events read never exported"
        time.sleep(1)
    assert _metric_total("mlaas4hep_data_events_read", pipeline) == 2421
    assert _metric_total("mlaas4hep_data_bytes_read", pipeline) > 2421 * 8
