"""The model bundle: written from a trained model, loads back and predicts the same."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mlaas4hep.bundle import write_bundle
from mlaas4hep.spec import MLPSpec, ModelSpec
from mlaas4hep.train.metrics import evaluate
from mlaas4hep.train.models import build_model

N_FEATURES = 4
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
SPECS = {"jdim": {}, "minv": {}, "maxv": {}, "fkeys": FEATURES, "jkeys": [], "nans": {}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model fitted on separable data and saved as model.keras."""
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.5).astype(np.float32)
    x = rng.normal(size=(400, N_FEATURES)).astype(np.float32) + 1.5 * y[:, None]
    model = build_model(ModelSpec(mlp=MLPSpec(layers=[8], learning_rate=0.05)), N_FEATURES)
    model.fit(x, y, epochs=3, batch_size=50, verbose=0)
    model_dir = tmp_path_factory.mktemp("model")
    model.save(model_dir / "model.keras")
    return model, model_dir, x, y


def bundle(trained, out, **overrides):
    model, model_dir, x, y = trained
    kwargs = dict(
        name="higgs",
        specs=SPECS,
        feature_names=FEATURES,
        labels=["0", "1"],
        metrics=evaluate(y, model(x).numpy()),
        owner="alice",
        run_id="run-1",
        spec_json='{"name": "higgs", "nan": "nan"}',
    )
    kwargs.update(overrides)
    return write_bundle(out, model_dir, **kwargs)


def test_bundle_loads_back_and_predicts_the_same(trained, tmp_path):
    import tensorflow as tf
    import tf_keras

    model, _, x, _ = trained
    out = bundle(trained, tmp_path / "bundle")
    expected = model(x).numpy()

    reloaded = tf_keras.models.load_model(out / "model.keras", compile=False)
    np.testing.assert_allclose(reloaded(x).numpy(), expected, rtol=1e-6, atol=1e-7)

    params = json.loads((out / "params.json").read_text())
    serving = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    outputs = serving(**{params["inputNode"]: tf.constant(x)})
    np.testing.assert_allclose(outputs[params["outputNode"]].numpy(), expected, rtol=1e-5)


def test_bundle_files_carry_tfaas_params_and_metadata(trained, tmp_path):
    out = bundle(trained, tmp_path / "bundle")
    params = json.loads((out / "params.json").read_text())
    assert set(params) == {
        "name",
        "model",
        "format",
        "labels",
        "inputNode",
        "outputNode",
        "description",
        "timestamp",
    }
    assert params["name"] == "higgs"
    assert params["model"] == "model.keras" and params["format"] == "tf_keras"
    assert (out / params["labels"]).read_text() == "0\n1\n"
    assert json.loads((out / "specs.json").read_text())["fkeys"] == FEATURES

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["owner"] == "alice"
    assert metadata["run_id"] == "run-1"
    spec_digest = hashlib.sha256(b'{"name": "higgs", "nan": "nan"}').hexdigest()
    assert metadata["spec_sha256"] == spec_digest
    assert metadata["feature_names"] == FEATURES
    assert metadata["metrics"]["auc"] > 0.8
    assert metadata["created"] == params["timestamp"]


def test_bundle_is_accepted_by_the_model_server_checks(trained, tmp_path):
    from mlaas4hep.bundle import check_bundle_dir

    out = bundle(trained, tmp_path / "bundle")
    assert check_bundle_dir(out, "higgs")["model"] == "model.keras"


def test_bundle_refuses_feature_names_that_do_not_fit_the_model(trained, tmp_path):
    with pytest.raises(ValueError, match=r"takes 4 inputs but 3 feature names were given"):
        bundle(trained, tmp_path / "bundle", feature_names=FEATURES[:3])


def test_bundle_needs_a_trained_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.keras: no trained model to bundle"):
        write_bundle(
            tmp_path / "out",
            tmp_path,
            name="m",
            specs=None,
            feature_names=[],
            labels=[],
            metrics={},
            owner="a",
            run_id="r",
            spec_json="{}",
        )


def test_onnx_export_scores_like_the_keras_model(trained, tmp_path):
    import onnxruntime

    model, _, x, _ = trained
    out = bundle(trained, tmp_path / "bundle", onnx=True)
    onnx = json.loads((out / "metadata.json").read_text())["onnx"]
    assert onnx["file"] == "model.onnx" and onnx["input"] == "features"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (scores,) = session.run([onnx["output"]], {"features": x})
    np.testing.assert_allclose(scores, model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "plain").exists()
    plain = bundle(trained, tmp_path / "plain")
    assert not (plain / "model.onnx").exists()
    assert json.loads((plain / "metadata.json").read_text())["onnx"] is None
