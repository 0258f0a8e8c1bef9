"""Every model format a TensorFlow user brings: checked, loaded, served and described.

One small Dense model saved five ways (frozen graph, SavedModel, Keras 3, tf_keras, ONNX)
is uploaded to TFaaS as gzip bundles and must answer with its own outputs on ``/json``,
``/predict/json`` and KServe v2 REST; files that do not match their format are refused
with a 400 that names them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from model_format_fixtures import (
    FORMATS,
    GRAPH_INPUT,
    GRAPH_OUTPUT,
    MODEL_FILES,
    N_FEATURES,
    X,
    bundle_files,
    dense_model,
)
from serve_fixtures import tarball

from mlaas4hep.bundle import BundleError, load_bundle
from mlaas4hep.modelfiles.safety import UnsafeModelError, check_model_file, model_format

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def _bundle_copy(source: Path, target: Path, **params: object) -> Path:
    """A copy of the bundle ``source`` at ``target`` with ``params`` changed."""
    shutil.copytree(source, target)
    data = json.loads((target / "params.json").read_text())
    (target / "params.json").write_text(json.dumps({**data, **params}))
    return target


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_predicts_the_model_own_outputs(format_bundles, fmt):
    model = load_bundle(format_bundles.folders[fmt], "m", 1)
    np.testing.assert_allclose(model.predict(X), format_bundles.expected, **TOLERANCE)
    info = model.describe()
    assert (info["format"], info["n_features"], info["n_outputs"]) == (fmt, N_FEATURES, 2)
    assert info["inputs"][0]["shape"] == [-1, N_FEATURES]
    assert info["outputs"][0]["shape"] == [-1, 2]


def test_each_format_is_described_with_its_own_tensor_names(format_bundles):
    names = {}
    for fmt in ("graphdef", "savedmodel", "keras", "onnx"):
        info = load_bundle(format_bundles.folders[fmt], "m", 1).describe()
        names[fmt] = (info["inputs"][0]["name"], info["outputs"][0]["name"])
    assert names["graphdef"] == (GRAPH_INPUT, GRAPH_OUTPUT)
    assert names["savedmodel"] == names["keras"] == names["onnx"] == ("features", "scores")


def test_keras_3_dense_stacks_keep_the_numpy_fast_path(format_bundles):
    model = load_bundle(format_bundles.folders["keras"], "m", 1)
    assert model._call.__qualname__.startswith("_dense_forward.")
    assert "tensorflow" not in type(model.predict(X)).__module__


@pytest.mark.parametrize(
    ("fmt", "file", "message"),
    [
        (
            "tf_keras",
            "model.onnx",
            "'model.onnx' cannot be loaded: by name and content it must be an ONNX",
        ),
        (
            "onnx",
            "model.h5",
            "'model.h5' cannot be loaded: by name and content it must be a tf_keras",
        ),
        (
            "onnx",
            "model.pb",
            "it must be a frozen TensorFlow graph .pb file (GraphDef), but it is an ONNX",
        ),
        (
            "keras",
            "model.bin",
            "'model.bin' cannot be loaded: expected a .keras, .h5, .pb or .onnx",
        ),
    ],
)
def test_a_model_file_named_as_another_format_is_refused_naming_it(
    format_bundles, tmp_path, fmt, file, message
):
    bundle = tmp_path / "b"
    bundle.mkdir()
    shutil.copy(format_bundles.folders[fmt] / MODEL_FILES[fmt], bundle / file)
    (bundle / "params.json").write_text(json.dumps({"name": "m", "model": file}))
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle, "m", 1)


def test_a_declared_format_must_match_the_file(format_bundles, tmp_path):
    bundle = _bundle_copy(format_bundles.folders["keras"], tmp_path / "b", format="tf_keras")
    with pytest.raises(BundleError, match=re.escape("'format' declares 'tf_keras'")):
        load_bundle(bundle, "m", 1)
    bundle = _bundle_copy(format_bundles.folders["onnx"], tmp_path / "c", format="pytorch")
    with pytest.raises(BundleError, match=re.escape("'format' 'pytorch' is not one of")):
        load_bundle(bundle, "m", 1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"inputNode": "dense_input"}, "inputNode 'dense_input' is not a node of the frozen graph"),
        ({"outputNode": "output_node9:0"}, "outputNode 'output_node9:0' is not a node"),
        ({"inputNode": GRAPH_OUTPUT}, f"inputNode {GRAPH_OUTPUT!r} is a Identity node, not a"),
    ],
)
def test_a_frozen_graph_node_the_graph_lacks_is_refused_naming_it(
    format_bundles, tmp_path, params, message
):
    bundle = _bundle_copy(format_bundles.folders["graphdef"], tmp_path / "b", **params)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle, "m", 1)


def test_frozen_graph_nodes_may_be_left_out_when_the_graph_has_one_of_each(
    format_bundles, tmp_path
):
    bundle = _bundle_copy(
        format_bundles.folders["graphdef"], tmp_path / "b", inputNode="", outputNode=""
    )
    model = load_bundle(bundle, "m", 1)
    assert model.describe()["inputs"][0]["name"] == GRAPH_INPUT
    np.testing.assert_allclose(model.predict(X), format_bundles.expected, **TOLERANCE)


def test_a_saved_model_graph_file_named_in_params_asks_for_its_folder(format_bundles, tmp_path):
    bundle = _bundle_copy(
        format_bundles.folders["savedmodel"], tmp_path / "b", model="saved_model/saved_model.pb"
    )
    with pytest.raises(BundleError, match=re.escape("name the SavedModel folder ('saved_model')")):
        load_bundle(bundle, "m", 1)


def test_a_saved_model_without_a_serving_signature_is_refused_naming_it(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.w = tf.Variable([1.0])
    tf.saved_model.save(module, str(tmp_path / "saved_model"))
    (tmp_path / "params.json").write_text(json.dumps({"name": "m", "model": "saved_model"}))
    with pytest.raises(BundleError, match="SavedModel 'saved_model' has no 'serving_default'"):
        load_bundle(tmp_path, "m", 1)


def test_a_saved_model_with_two_inputs_is_refused_naming_them(tmp_path):
    import tensorflow as tf

    spec = tf.TensorSpec([None, 2], tf.float32)
    serve = tf.function(lambda a, b: {"sum": a + b}, input_signature=[spec, spec])
    module = tf.Module()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": serve})
    (tmp_path / "params.json").write_text(json.dumps({"name": "m", "model": "sm"}))
    with pytest.raises(BundleError, match=re.escape("takes ['a', 'b'] and gives ['sum']")):
        load_bundle(tmp_path, "m", 1)


# --------------------------------------------------------------------------- safety


def _graph_with_op(path: Path, op: str) -> Path:
    """A frozen graph whose output comes from a node of type ``op``."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.node.add(name="x", op="Placeholder").attr["dtype"].type = 1
    node = graph.node.add(name="y", op=op, input=["x"])
    node.attr["T"].type = 1
    path.write_bytes(graph.SerializeToString())
    return path


@pytest.mark.parametrize(
    ("op", "rule"),
    [
        ("PyFunc", "may not read or write files, call Python"),
        ("ReadFile", "may not read or write files"),
        ("RandomUniform", "only stateless ops"),
        ("MyCustomOp", "not an op built into TensorFlow"),
    ],
)
def test_frozen_graphs_with_io_python_stateful_or_custom_ops_are_refused(tmp_path, op, rule):
    path = _graph_with_op(tmp_path / "model.pb", op)
    with pytest.raises(UnsafeModelError, match=re.escape(f"op {op!r} (graph node 'y')")) as error:
        check_model_file(path)
    assert rule in str(error.value)


def _onnx_file(path: Path, domain: str = "", external: bool = False) -> Path:
    """A one-node ONNX model (``Relu``, or a node of a custom ``domain``), its weight in an
    external file when ``external``."""
    from onnx import TensorProto, helper

    node = helper.make_node("Relu" if not domain else "Evil", ["x"], ["y"], domain=domain)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    if external:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializer=[weight],
    )
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path.write_bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())
    return path


def test_onnx_models_of_standard_domains_pass_and_custom_op_domains_are_refused(tmp_path):
    assert check_model_file(_onnx_file(tmp_path / "ok.onnx")) == "onnx"
    with pytest.raises(UnsafeModelError, match=re.escape("domain 'com.microsoft' is refused")):
        check_model_file(_onnx_file(tmp_path / "custom.onnx", domain="com.microsoft"))


def test_onnx_tensors_in_external_files_are_refused(tmp_path):
    with pytest.raises(UnsafeModelError, match=re.escape("tensor 'w' is refused: its data is in")):
        check_model_file(_onnx_file(tmp_path / "ext.onnx", external=True))


def test_keras_3_archives_are_told_from_tf_keras_ones_by_their_metadata(format_bundles, tmp_path):
    assert model_format(format_bundles.folders["keras"] / "model.keras") == "keras"
    dense_model().save(tmp_path / "legacy.keras")
    assert model_format(tmp_path / "legacy.keras") == "tf_keras"


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"module": "keras.layers", "class_name": "Lambda"}, "(Lambda)"),
        ({"module": "evil.layers", "class_name": "Dense"}, "module 'evil.layers'"),
        ({"module": "keras.layers", "class_name": "Mystery"}, "not a built-in Keras class"),
    ],
)
def test_keras_3_archives_with_lambda_or_unknown_modules_are_refused_before_loading(
    format_bundles, tmp_path, layer, message
):
    import zipfile

    source = format_bundles.folders["keras"] / "model.keras"
    target = tmp_path / "model.keras"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1].update(layer)
                data = json.dumps(config).encode()
            out.writestr(item, data)
    (tmp_path / "params.json").write_text(json.dumps({"name": "m", "model": "model.keras"}))
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(tmp_path, "m", 1)


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def uploaded(tfaas, format_bundles) -> dict[str, str]:
    """Each format's bundle uploaded as a gzip tarball by alice: model name by format."""
    names = {}
    with tfaas.client() as client:
        for fmt, folder in format_bundles.folders.items():
            name = json.loads((folder / "params.json").read_text())["name"]
            answer = client.post("/upload", content=tarball(bundle_files(folder, top=name)))
            assert answer.status_code == 200, (fmt, answer.text)
            names[fmt] = name
    return names


@pytest.mark.ray
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_uploaded_format_answers_json_and_predict_json_with_its_own_outputs(
    tfaas, format_bundles, uploaded, fmt
):
    with tfaas.client() as client:
        for route in ("/json", "/predict/json"):
            answer = client.post(route, json={"values": X.tolist(), "model": uploaded[fmt]})
            assert answer.status_code == 200, (route, answer.text)
            np.testing.assert_allclose(answer.json(), format_bundles.expected, **TOLERANCE)


@pytest.fixture(scope="module")
def triton(tfaas):
    """A ``tritonclient`` HTTP client of the test app."""
    import tritonclient.http as http

    url = urlparse(tfaas.url)
    client = http.InferenceServerClient(url=f"{url.netloc}{url.path}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_grpc(tfaas):
    """A ``tritonclient`` gRPC client of the test app's gRPC port."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=tfaas.settings.grpc_address)
    yield client
    client.close()


@pytest.mark.ray
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_uploaded_format_answers_kserve_v2_infer_with_its_own_outputs(
    request, tfaas, format_bundles, uploaded, fmt, protocol
):
    """Over KServe v2 REST and gRPC, with Triton's clients as they are (the bearer token
    is the only header)."""
    if protocol == "http":
        import tritonclient.http as triton_module

        client, headers = request.getfixturevalue("triton"), tfaas.headers()
    else:
        import tritonclient.grpc as triton_module

        client = request.getfixturevalue("triton_grpc")
        headers = {"authorization": tfaas.headers()["Authorization"]}
    rows = np.concatenate([X] * 8)  # 40 rows: more than the ingress predicts itself
    for x in (X, rows):
        tensor = triton_module.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)  # binary tensor data on both protocols
        result = client.infer(uploaded[fmt], [tensor], headers=headers)
        np.testing.assert_allclose(
            result.as_numpy("output"),
            np.concatenate([format_bundles.expected] * 8)[: len(x)],
            **TOLERANCE,
        )


@pytest.mark.ray
@pytest.mark.parametrize("fmt", FORMATS)
def test_params_models_and_kserve_metadata_show_each_format_and_its_tensors(
    tfaas, triton, uploaded, fmt
):
    name = uploaded[fmt]
    with tfaas.client() as client:
        params = client.get(f"/params/{name}").json()
        listed = {m["name"]: m for m in client.get("/models").json()}
    assert params["format"] == listed[name]["format"] == fmt
    assert params["inputs"][0]["shape"] == [-1, N_FEATURES]
    assert params["outputs"][0]["shape"] == [-1, 2]
    assert params["inputNode"] == params["inputs"][0]["name"]
    metadata = triton.get_model_metadata(name, headers=tfaas.headers())
    assert metadata["parameters"]["format"] == fmt
    assert metadata["parameters"]["model_input"] == params["inputs"][0]["name"]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]


@pytest.mark.ray
@pytest.mark.parametrize(
    ("fmt", "file", "params", "message"),
    [
        ("tf_keras", "model.onnx", {}, "'model.onnx' cannot be loaded: by name and content"),
        ("graphdef", "model.pb", {"outputNode": "scores"}, "outputNode 'scores' is not a node"),
        ("onnx", "model.onnx", {"corrupt": True}, "model.onnx: not a valid ONNX model"),
    ],
)
def test_a_mismatched_or_corrupt_upload_answers_400_naming_the_file(
    tfaas, format_bundles, fmt, file, params, message
):
    name = f"bad-{fmt.replace('_', '-')}"
    files = bundle_files(format_bundles.folders[fmt])
    model = files.pop(MODEL_FILES[fmt])
    files[file] = b"\x08\x07\x12\x04junk\xff\xff" if params.pop("corrupt", False) else model
    base = {"name": name, "model": file, "inputNode": GRAPH_INPUT, "outputNode": GRAPH_OUTPUT}
    files["params.json"] = json.dumps({**base, **params}).encode()
    with tfaas.client() as client:
        answer = client.post("/upload", content=tarball(files))
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    assert tfaas.registry.versions(name) == []
