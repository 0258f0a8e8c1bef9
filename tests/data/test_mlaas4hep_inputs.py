"""MLaaS4HEP's own inputs (tests/inputs/mlaas4hep, copied from its repository), read as it
writes them.

Every entry point builds its spec with :func:`spec_from_mlaas4hep_inputs`: ``mlaas4hep run``
and ``mlaas4hep submit --files`` here, the ``/mlaas4hep`` server flow in
test_oidc_provider.py and the Ray Job runs in test_e2e.py. No Ray here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlaas4hep_examples import NANOAOD, mlaas4hep_example

from mlaas4hep.cli.main import _load_spec_arg, build_parser
from mlaas4hep.spec import (
    SpecError,
    load_spec,
    parse_spec,
    spec_from_mlaas4hep_inputs,
)

CMS_REDIRECTOR = "root://cms-xrd-global.cern.ch"


def test_mlaas4hep_src_python_params_keep_their_meaning(tmp_path: Path) -> None:
    folder = mlaas4hep_example(tmp_path, "src_python")
    spec = spec_from_mlaas4hep_inputs(
        folder / "files.txt", folder / "labels.txt", folder / "params.json"
    )
    assert (spec.nevts, spec.chunk_size, spec.epochs, spec.batch_size) == (3000, 1000, 50, 256)
    assert spec.shuffle == "blocks" and spec.verbose == 1 and spec.branch == "Events"
    assert spec.selected_branches == [] and spec.exclude_branches == []
    assert spec.redirector == CMS_REDIRECTOR
    # The logical names of files.txt are read through the redirector, as MLaaS4HEP's xfile does.
    first = (folder / "files.txt").read_text().splitlines()[1]
    assert first.startswith("/store/data/Run2018C/Tau/NANOAOD/")
    assert spec.resolved_paths()[0] == f"{CMS_REDIRECTOR}/{first}"
    assert [f.label for f in spec.files] == [1, 0, 1, 0, 1, 1, 1]
    assert spec.model_extra == {"hist": "pdfs"}
    assert spec.unused_keys_message() == (
        "spec keys accepted and ignored: MLaaS4HEP keys with no use here: hist"
    )
    assert spec.resources.num_workers is None and spec.resources.cpus_per_worker is None


def test_mlaas4hep_workflow_recipe_params_keep_their_meaning(tmp_path: Path) -> None:
    folder = mlaas4hep_example(tmp_path, "recipe")
    spec = spec_from_mlaas4hep_inputs(
        folder / "files.txt", folder / "labels.txt", folder / "params.json"
    )
    assert (spec.nevts, spec.chunk_size, spec.epochs, spec.batch_size) == (50000, 10000, 5, 100)
    assert spec.shuffle == "blocks" and spec.identifier == []
    assert spec.exclude_branches == ["run", "event", "luminosityBlock"]
    # "redirector": "" is no prefix: the relative names are local files beside files.txt.
    assert spec.redirector is None
    assert spec.resolved_paths() == [
        str(folder / "GluGluToHToTauTau.root"),
        str(folder / "VBF_HToTauTau.root"),
    ]


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize("name", ["src_python", "recipe"])
def test_cli_reads_mlaas4hep_examples_with_files_labels_params_and_model(
    tmp_path: Path, shared_data: Path, command: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = mlaas4hep_example(tmp_path, name, files=[str(shared_data / NANOAOD)] * 2)
    (folder / "model.py").write_text("def model(idim):\n    raise NotImplementedError\n")
    argv = [command, "--files", str(folder / "files.txt"), "--labels", str(folder / "labels.txt")]
    argv += ["--params", str(folder / "params.json"), "--model", str(folder / "model.py")]
    spec = _load_spec_arg(build_parser().parse_args(argv))
    assert [(f.path, f.label) for f in spec.files] == [
        (str(shared_data / NANOAOD), 1),
        (str(shared_data / NANOAOD), 0),
    ]
    # A local file stays local beside any redirector; the params are MLaaS4HEP's own.
    assert spec.resolved_paths() == [str(shared_data / NANOAOD)] * 2
    assert spec.shuffle == "blocks" and spec.model.file == str(folder / "model.py")
    assert "spec keys accepted and ignored: MLaaS4HEP keys with no use here: hist" in caplog.text
    params = json.loads((folder / "params.json").read_text())
    assert spec.epochs == params["epochs"] and spec.nevts == params["nevts"]


def test_shuffle_takes_mlaas4hep_booleans_beside_the_platform_modes() -> None:
    files = [{"path": "a.root", "label": 1}]
    pairs = [(True, "blocks"), (False, "none"), ("none", "none"), ("global", "global")]
    assert [parse_spec({"files": files, "shuffle": v}).shuffle for v, _ in pairs] == [
        mode for _, mode in pairs
    ]
    with pytest.raises(SpecError, match="shuffle: Input should be 'none', 'blocks' or 'global'"):
        parse_spec({"files": files, "shuffle": "sometimes"})


def test_relative_names_without_a_local_file_are_read_through_the_redirector(
    tmp_path: Path,
) -> None:
    (tmp_path / "here.root").write_bytes(b"")
    (tmp_path / "files.txt").write_text("here.root\nremote/there.root\n/store/mc/x.root\n")
    (tmp_path / "labels.txt").write_text("1\n0\n1\n")
    (tmp_path / "params.json").write_text(json.dumps({"redirector": "root://xcache:1094/"}))
    spec = spec_from_mlaas4hep_inputs(
        tmp_path / "files.txt", tmp_path / "labels.txt", tmp_path / "params.json"
    )
    assert spec.resolved_paths() == [
        str(tmp_path / "here.root"),
        "root://xcache:1094/remote/there.root",
        "root://xcache:1094//store/mc/x.root",
    ]


def test_unknown_top_level_keys_warn_but_unknown_keys_of_platform_blocks_are_refused(
    tmp_path: Path,
) -> None:
    """Top-level keys may come from MLaaS4HEP's params.json (accepted, warned about); the
    platform's own blocks (resources, training, model, ...) keep refusing what they do not
    know, so a typo there is not silently ignored."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("files: [{path: a.root, label: 1}]\nhists: pdfs\nmy_note: x\n")
    spec = load_spec(spec_file)
    assert spec.unused_keys_message() == (
        "spec keys accepted and ignored: MLaaS4HEP keys with no use here: hists; "
        "unknown keys: my_note"
    )
    spec_file.write_text("files: [{path: a.root, label: 1}]\nresources: {num_worker: 2}\n")
    with pytest.raises(SpecError, match=r"resources\.num_worker: Extra inputs are not permitted"):
        load_spec(spec_file)
