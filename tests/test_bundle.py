"""Model bundles: params spellings, tarball checks, input matrices, loading real models."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from serve_fixtures import FEATURES, local_predict, make_bundle, tarball

from mlaas4hep.bundle import (
    BundleError,
    InputError,
    UploadLimits,
    check_bundle_dir,
    extract_tarball,
    feature_names_of,
    load_bundle,
    normalize_params,
    parse_params,
    read_tree,
    to_matrix,
    write_tree,
)


def test_params_accept_both_tfaas_key_spellings():
    snake = normalize_params({"name": "m", "input_node": "in", "output_node": "out"})
    camel = normalize_params({"name": "m", "inputNode": "in", "outputNode": "out"})
    assert snake == camel
    assert snake["inputNode"] == "in" and "input_node" not in snake
    assert snake["model"] == "model.keras" and snake["labels"] == "labels.txt"


def test_params_with_disagreeing_spellings_are_refused():
    with pytest.raises(BundleError, match=re.escape("'inputNode' and 'input_node' disagree")):
        normalize_params({"name": "m", "inputNode": "a", "input_node": "b"})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{oops", "params.json: not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"name": 3}', "'name' must be a string"),
        (b'{"name": "m", "model": "../../etc/passwd"}', "'model' must name a file inside"),
        (b'{"name": "m", "labels": "/etc/passwd"}', "'labels' must name a file inside"),
    ],
)
def test_bad_params_files_are_refused_with_the_reason(raw, message):
    with pytest.raises(BundleError, match=re.escape(message)):
        parse_params(raw)


def _write(folder, files):
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_bundle_check_names_the_missing_or_mismatched_part(tmp_path):
    with pytest.raises(BundleError, match=re.escape("bundle has no params.json")):
        check_bundle_dir(tmp_path)
    _write(tmp_path, {"params.json": b'{"name": "higgs", "model": "m.keras"}'})
    with pytest.raises(BundleError, match=re.escape("no model file 'm.keras'")):
        check_bundle_dir(tmp_path)
    _write(tmp_path, {"m.keras": b"x"})
    with pytest.raises(
        BundleError, match=re.escape("names model 'higgs' but the upload names 'zz'")
    ):
        check_bundle_dir(tmp_path, "zz")
    _write(tmp_path, {"specs.json": b"{bad"})
    with pytest.raises(BundleError, match=re.escape("specs.json: not valid JSON")):
        check_bundle_dir(tmp_path)
    _write(tmp_path, {"specs.json": b"{}", "params.json": b'{"name": "-bad/name"}'})
    with pytest.raises(BundleError, match=re.escape("invalid model name")):
        check_bundle_dir(tmp_path)


def test_registered_bundle_takes_the_registry_name_when_params_lack_or_differ(tmp_path):
    _write(tmp_path, {"params.json": b"{}", "model.keras": b"m"})
    with pytest.raises(BundleError, match=re.escape("params.json has no model 'name'")):
        check_bundle_dir(tmp_path)
    assert check_bundle_dir(tmp_path, "higgs")["name"] == "higgs"
    _write(tmp_path, {"params.json": b'{"name": "run-42"}'})
    assert check_bundle_dir(tmp_path, "higgs", match=False)["name"] == "higgs"


def test_tarball_with_a_top_folder_unpacks_to_that_folder(tmp_path):
    body = tarball({"higgs/params.json": b'{"name": "higgs"}', "higgs/model.keras": b"m"})
    root = extract_tarball(body, tmp_path / "out")
    assert root == tmp_path / "out" / "higgs"
    assert check_bundle_dir(root)["name"] == "higgs"


def _hardlink_tarball():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("params.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
        link = tarfile.TarInfo("copy")
        link.type = tarfile.LNKTYPE
        link.linkname = "params.json"
        archive.addfile(link)
    return buffer.getvalue()


def _fifo_tarball():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("pipe")
        info.type = tarfile.FIFOTYPE
        archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "limits", "message"),
    [
        (tarball({"a/../../x": b"1"}), None, "leaves the bundle"),
        (tarball({"/etc/cron.d/x": b"1"}), None, "has an absolute path"),
        (tarball({}, links={"params.json": "/etc/passwd"}), None, "is a link"),
        (_hardlink_tarball(), None, "'copy' is a link"),
        (_fifo_tarball(), None, "not a regular file or folder"),
        (tarball({"big": b"0" * 101}), UploadLimits(max_member_bytes=100), "101 bytes"),
        (
            tarball({"a": b"0" * 60, "b": b"0" * 60}),
            UploadLimits(max_bytes=100),
            "unpacks to more than 100 bytes",
        ),
        (tarball({str(i): b"" for i in range(5)}), UploadLimits(max_members=3), "more than 3"),
        (b"plain text", None, "not a gzip tarball (no gzip header)"),
        (b"\x1f\x8b\x08\x00garbage", None, "not a valid gzip tarball"),
        (tarball({"a/params.json": b"{}", "b/params.json": b"{}"}), None, "no params.json"),
    ],
)
def test_unsafe_or_broken_tarballs_are_refused_before_writing(tmp_path, body, limits, message):
    out = tmp_path / "out"
    with pytest.raises(BundleError, match=re.escape(message)):
        extract_tarball(body, out, limits)
    assert not (tmp_path / "x").exists()
    assert not any(p.is_file() and p.name in {"x", "big", "pipe"} for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "'values' must be a non-empty list"),
        ("1,2", "'values' must be a non-empty list"),
        ([1.0, "2"], "values[1] is '2', not a number"),
        ([1.0, True], "values[1] is True, not a number"),
        ([[1.0, 2.0], [3.0]], "values[1] has 1 values, row 0 has 2"),
        ([[1.0], 2.0], "values[1] must be a row"),
        ([[]], "rows are empty"),
    ],
)
def test_bad_values_are_refused_with_their_position(values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        to_matrix(values)


def test_values_become_a_float32_matrix_with_padding_as_zero():
    matrix = to_matrix([[1, float("nan")], [None, 2.5]])
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, [[1.0, 0.0], [0.0, 2.5]])
    assert to_matrix([1.0, 2.0]).shape == (1, 2)


def test_feature_names_come_from_metadata_or_specs(tmp_path):
    (tmp_path / "specs.json").write_text(
        json.dumps({"fkeys": ["nJet"], "jkeys": ["Jet_pt"], "jdim": {"Jet_pt": 2}})
    )
    assert feature_names_of(tmp_path, 3) == ["nJet", "Jet_pt_0", "Jet_pt_1"]
    assert feature_names_of(tmp_path, 4) == []
    (tmp_path / "metadata.json").write_text(json.dumps({"feature_names": ["a", "b", "c"]}))
    assert feature_names_of(tmp_path, 3) == ["a", "b", "c"]


def test_loaded_bundle_predicts_like_the_keras_model(tmp_path):
    bundle = make_bundle(tmp_path / "b", "multi", n_outputs=3)
    model = load_bundle(bundle, "multi", 1)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), local_predict(bundle, x), rtol=1e-6, atol=1e-7)
    info = model.describe()
    assert (info["n_features"], info["n_outputs"]) == (4, 3)
    assert info["labels"] == ["class0", "class1", "class2"]
    assert info["feature_names"] == FEATURES
    assert model.columns_for(list(reversed(FEATURES)), 4) == [3, 2, 1, 0]
    assert model.columns_for(FEATURES, 4) is None
    with pytest.raises(InputError, match=re.escape("takes 4 values a row, got 5")):
        model.columns_for(None, 5)


def test_bundle_files_round_trip_between_processes(tmp_path):
    bundle = make_bundle(tmp_path / "b", "copy")
    copy = write_tree(read_tree(bundle), tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundle.iterdir())
    with pytest.raises(BundleError, match=re.escape("leaves the bundle")):
        write_tree({"../x": b"1"}, tmp_path / "evil")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("model.keras", b"not a zip", "model file 'model.keras' cannot be loaded"),
        ("model.bin", b"x", "expected a .keras, .h5, .pb or .onnx file or a SavedModel folder"),
        ("model.pb", b"x", "but it is no model format"),
        ("model.onnx", b"\x08\x07\x12\x04junk\xff\xff", "model.onnx: not a valid ONNX model"),
        ("model.pb", b"\x0a\x03\x0a\x01\xff\xff", "model.pb: not a valid frozen TensorFlow graph"),
        ("model.keras", b"PK\x03\x04broken", "model.keras: not a valid .keras archive"),
        ("model.h5", b"\x89HDF\r\n\x1a\nbroken", "model.h5: not a readable HDF5 file"),
    ],
)
def test_unloadable_or_corrupt_model_files_are_bundle_errors_naming_them(
    tmp_path, name, data, message
):
    (tmp_path / "params.json").write_text(json.dumps({"name": "bad", "model": name}))
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(tmp_path, "bad", 1)
