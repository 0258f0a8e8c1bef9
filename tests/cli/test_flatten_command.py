"""`mlaas4hep flatten` / `specs` run locally (forked processes) or on Ray: how the
execution is chosen, and that both write the same files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import uproot
from root_helpers import damaged_copy

from mlaas4hep.cli.demo import write_demo_data
from mlaas4hep.cli.main import main
from mlaas4hep.data.datasets import choose_execution
from mlaas4hep.data.datasource import root_datasource
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.execution import ForkedWorkers
from mlaas4hep.data.rootio import inspect_inputs
from mlaas4hep.spec import load_spec, parse_spec


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), events=1500, seed=4)


def write_spec(folder: Path, files: tuple[Path, ...], **extra) -> Path:
    spec = folder / "spec.json"
    data = {"files": [str(p) for p in files], "labels": list(range(len(files)))[::-1], **extra}
    spec.write_text(json.dumps(data))
    return spec


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- no Ray --------------------------------------------------------------------------


def test_forked_workers_run_phases_with_the_parents_input_and_raise_a_workers_error() -> None:
    def work(index: int):
        offset = yield index * 10
        yield offset + index

    with ForkedWorkers(3, work) as pool:
        assert pool.gather() == [0, 10, 20]
        pool.send(100)
        assert pool.gather() == [100, 101, 102]

    def failing(index: int):
        if index == 1:
            raise DataError("f.root: tree 'Events': reading branch 'x' failed")
        yield index

    with (
        pytest.raises(DataError, match="reading branch 'x' failed"),
        ForkedWorkers(2, failing) as pool,
    ):
        pool.gather()


def test_execution_is_local_for_local_files_even_with_a_head_and_ray_when_the_spec_needs_it(
    demo_files,
) -> None:
    spec = parse_spec({"files": [str(p) for p in demo_files], "labels": [1, 0]})
    summary = inspect_inputs(spec)
    local = choose_execution(spec, summary)
    assert local.kind == "local" and local.workers >= 1
    assert local.describe().endswith(
        f"(the 2 inputs are local files: {local.workers} local processes)"
    )
    beside_a_head = choose_execution(spec, summary, address="127.0.0.1:6379")
    assert beside_a_head.kind == "local"
    asked = choose_execution(spec, summary, "ray", address="127.0.0.1:6379")
    assert (asked.kind, asked.address) == ("ray", "127.0.0.1:6379")
    assert choose_execution(spec, summary, connected=True).kind == "ray"

    shuffled = spec.model_copy(update={"shuffle": "global"})
    chosen = choose_execution(shuffled, summary)
    assert chosen.kind == "ray" and chosen.why.startswith("shuffle: global needs Ray")
    assert chosen.why.endswith("starting a local Ray")
    on_head = choose_execution(shuffled, summary, address="127.0.0.1:6379")
    assert on_head.describe().endswith("reusing the Ray head at 127.0.0.1:6379)")
    remote_file = dataclasses.replace(summary.files[0], path="root://eos.example//f.root")
    remote = dataclasses.replace(summary, files=[remote_file, summary.files[1]])
    assert choose_execution(spec, remote).why.startswith("remote input root://eos.example//f.root")
    with pytest.raises(DataError, match="local execution: shuffle: global needs Ray"):
        choose_execution(shuffled, summary, requested="local")


def test_local_flatten_failing_in_a_worker_names_file_and_branch(
    shared_data: Path, tmp_path: Path, capsys
) -> None:
    damaged = damaged_copy(shared_data / "uproot-HZZ.root", "events", "Jet_E", tmp_path / "d.root")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"files": [str(damaged)], "labels": [1], "branch": "events"}))
    out = str(tmp_path / "out")
    code, printed, err = run_cli(capsys, "flatten", str(spec), "--out", out, "--execution", "local")
    assert code == 1 and "Traceback" not in err and printed.startswith("execution: local")
    assert err.startswith(f"error: {damaged}: tree 'events': reading branch 'Jet_E' entries")


# --- on the session's Ray cluster ------------------------------------------------------


def read_folder(folder: Path) -> dict[str, bytes]:
    """The content of every file a flatten output folder holds, by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.ray
def test_local_and_ray_executions_write_the_same_files_and_specs(
    ray_cluster, demo_files, tmp_path: Path, capsys
) -> None:
    spec = write_spec(
        tmp_path, demo_files, chunk_size=400, identifier=["event"], max_jagged_dim=3,
        shuffle="blocks",
    )  # fmt: skip
    outputs = {}
    for execution in ("local", "ray"):
        out = tmp_path / execution
        argv = ["flatten", str(spec), "--out", str(out), "--execution", execution]
        code, printed, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert printed.startswith(f"execution: {'local' if execution == 'local' else 'Ray'}")
        outputs[execution] = read_folder(out)
    local, on_ray = outputs["local"], outputs["ray"]
    assert list(local) == list(on_ray)
    chunks = len(root_datasource(load_spec(spec)).chunks)
    assert chunks > 2 and [name for name in local if name.startswith("events/")] == [
        f"events/part-{i:05d}.parquet" for i in range(chunks)
    ]
    for name, content in local.items():
        assert content == on_ray[name], f"{name} differs between local and Ray execution"
    assert json.loads(local["specs.json"])["events"]["total"] == 3000
    table = pq.read_table(tmp_path / "local" / "events")
    assert table.column_names == ["features", "mask", "label", "event"]
    events = [e for f in demo_files for e in uproot.open(f)["Events"]["event"].array().tolist()]
    assert sorted(table.column("event").to_pylist()) == sorted(events)

    specs = {}
    for execution in ("local", "ray"):
        out = tmp_path / f"specs-{execution}.json"
        argv = ["specs", str(spec), "--out", str(out), "--execution", execution]
        assert run_cli(capsys, *argv)[0] == 0
        specs[execution] = json.loads(out.read_text())
    assert specs["local"] == specs["ray"] == json.loads(local["specs.json"])


@pytest.mark.ray
def test_flatten_with_specs_of_the_same_inputs_reads_once_and_writes_the_same_parts(
    ray_cluster, demo_files, tmp_path: Path, capsys
) -> None:
    spec = write_spec(tmp_path, demo_files, chunk_size=1000)
    first = tmp_path / "first"
    assert (
        run_cli(capsys, "flatten", str(spec), "--out", str(first), "--execution", "local")[0] == 0
    )
    for execution in ("local", "ray"):
        out = tmp_path / execution
        argv = ["flatten", str(spec), "--out", str(out), "--specs", str(first / "specs.json")]
        code, printed, err = run_cli(capsys, *argv, "--execution", execution)
        assert code == 0, err
        assert f"reused specs: {first / 'specs.json'} was computed from the same inputs" in printed
        written, before = read_folder(out), read_folder(first)
        assert written.keys() == before.keys()
        for name, content in written.items():
            assert content == before[name] or name == "specs.json", name
