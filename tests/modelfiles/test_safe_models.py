"""Users' model files are checked before any Keras loader sees them and load in safe mode.

Every hostile model here (tests/safe_model_fixtures.py) would write a marker file if any
of its code ran; the tests refuse it and then check that the marker never appeared.
``test_the_plain_keras_loaders_run_code_of_these_files`` proves the markers do appear when
the same files go through the loaders the platform used before.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf
import tf_keras
from safe_model_fixtures import (
    custom_layer_model_file,
    hostile_sequential,
    lambda_model_file,
    marking_lambda,
)

from mlaas4hep.modelfiles.safety import (
    UnsafeModelError,
    check_keras_config,
    check_model_file,
    load_keras_model,
)

ROWS = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]], dtype=np.float32)


def dense_model(compiled: bool = True) -> Any:
    """A tiny tf_keras MLP on 3 features, compiled with Adam, binary cross-entropy, AUC."""
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input(shape=(3,), name="features"),
            tf_keras.layers.Dense(4, activation="relu", kernel_regularizer="l2"),
            tf_keras.layers.Dense(1, activation="sigmoid", name="scores"),
        ]
    )
    if compiled:
        model.compile(
            optimizer=tf_keras.optimizers.Adam(1e-3),
            loss="binary_crossentropy",
            metrics=["accuracy", tf_keras.metrics.AUC()],
        )
    return model


@tf_keras.saving.register_keras_serializable(package="operator")
class Scale(tf_keras.layers.Layer):
    """A harmless custom layer an operator may allow-list."""

    def call(self, inputs: Any) -> Any:
        return inputs * 3.0


def rewrite_archive_config(path: Path, change: Any) -> None:
    """Apply ``change`` to the config.json of the .keras archive ``path``, in place."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    change(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def layer_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["config"]["layers"]


class FileIO(tf.Module):
    """A SavedModel whose serving signature reads or writes a file."""

    def __init__(self, op: str, path: Path) -> None:
        super().__init__()
        self.op, self.path = op, str(path)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def serve(self, x: Any) -> Any:
        if self.op == "write":
            tf.io.write_file(self.path, "ran")
            return {"scores": x}
        return {"scores": x + tf.strings.to_number(tf.io.read_file(self.path))}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran.marker"


# --------------------------------------------------------------------------- safe files load


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "saved_model"])
def test_a_dense_model_loads_compiled_and_predicts_like_the_original(tmp_path, name):
    model = dense_model()
    model.save(tmp_path / name)
    loaded = load_keras_model(tmp_path / name, compile=True)
    np.testing.assert_allclose(
        np.asarray(loaded(ROWS)), np.asarray(model(ROWS)), rtol=1e-6, atol=1e-7
    )
    assert type(loaded.optimizer).__name__ == "Adam"
    assert loaded.compiled_loss is not None


def test_pure_tensorflow_math_in_a_functional_model_passes(tmp_path):
    inputs = tf_keras.Input((3,))
    hidden = tf.math.abs(tf_keras.layers.Dense(4)(inputs))[:, :2]
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(1)(tf.reshape(hidden, (-1, 2))))
    model.save(tmp_path / "math.keras")
    loaded = load_keras_model(tmp_path / "math.keras")
    np.testing.assert_allclose(np.asarray(loaded(ROWS)), np.asarray(model(ROWS)), rtol=1e-6)


def test_an_operator_allow_listed_layer_loads_and_others_stay_refused(tmp_path):
    hostile_sequential(Scale(name="scale")).save(tmp_path / "scaled.keras")
    with pytest.raises(UnsafeModelError, match=re.escape("'scale' (Scale)")):
        check_model_file(tmp_path / "scaled.keras", allowed=())
    loaded = load_keras_model(tmp_path / "scaled.keras", allowed=["Scale"])
    assert isinstance(loaded.layers[0], Scale)
    with pytest.raises(UnsafeModelError, match=re.escape("'lambda' (Lambda)")):
        check_model_file(lambda_model_file(tmp_path / "l.keras", tmp_path / "m"), ["Scale"])


def test_the_allow_list_setting_reads_comma_separated_names(monkeypatch, tmp_path):
    from mlaas4hep.settings import load_settings

    monkeypatch.setenv("MLAAS4HEP_ALLOWED_MODEL_LAYERS", "Scale, Other")
    assert load_settings().allowed_model_layers == ["Scale", "Other"]
    hostile_sequential(Scale(name="scale")).save(tmp_path / "scaled.keras")
    check_model_file(tmp_path / "scaled.keras")  # None: the operator's setting


# --------------------------------------------------------------------------- code never runs


HOSTILE = {
    "lambda-h5": (lambda_model_file, "model.h5", "layer 'lambda' (Lambda)"),
    "lambda-keras": (lambda_model_file, "model.keras", "layer 'lambda' (Lambda)"),
    "custom-keras": (
        custom_layer_model_file,
        "model.keras",
        "'marking' (Marking) registered as 'tenant>",
    ),
    "custom-h5": (custom_layer_model_file, "model.h5", "'marking' (tenant>Marking)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_lambda_and_unknown_layers_are_refused_and_never_run(tmp_path, marker, case):
    make, name, layer = HOSTILE[case]
    path = make(tmp_path / name, marker)
    with pytest.raises(UnsafeModelError) as refused:
        load_keras_model(path, compile=True)
    message = str(refused.value)
    assert message.startswith(name) and layer in message, message
    assert not marker.exists()


@pytest.mark.parametrize("case", ["lambda-h5", "custom-keras"])
def test_the_plain_keras_loaders_run_code_of_these_files(tmp_path, marker, case):
    """The control of the test above: what the platform's loaders did before."""
    make, name, _ = HOSTILE[case]
    path = make(tmp_path / name, marker)
    tf_keras.models.load_model(path, compile=False)
    assert marker.exists()


def test_a_lambda_is_refused_even_inside_a_nested_model(tmp_path, marker):
    inner = hostile_sequential(marking_lambda(marker))
    outer = tf_keras.Sequential([tf_keras.layers.Input((3,)), inner])
    outer.save(tmp_path / "nested.h5")
    marker.unlink()
    with pytest.raises(UnsafeModelError, match=re.escape("layer 'lambda' (Lambda) in")):
        load_keras_model(tmp_path / "nested.h5")
    assert not marker.exists()


def test_a_tf_op_layer_calling_a_file_op_is_refused(tmp_path):
    inputs = tf_keras.Input((3,))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(1)(tf.math.abs(inputs)))
    model.save(tmp_path / "op.keras")

    def to_read_file(config: dict[str, Any]) -> None:
        op = next(layer for layer in layer_configs(config) if layer["class_name"] == "TFOpLambda")
        op["config"]["function"] = "io.read_file"

    rewrite_archive_config(tmp_path / "op.keras", to_read_file)
    with pytest.raises(UnsafeModelError, match=re.escape("calling tf.io.read_file")):
        load_keras_model(tmp_path / "op.keras")


@pytest.mark.parametrize("op", ["read", "write"])
def test_a_saved_model_with_a_file_op_in_its_signature_is_refused(tmp_path, op):
    target = tmp_path / "target.txt"
    target.write_text("1")
    module = FileIO(op, target)
    tf.saved_model.save(module, str(tmp_path / "io"), signatures={"serving_default": module.serve})
    target.unlink()
    with pytest.raises(UnsafeModelError, match=f"op '{op.capitalize()}File'"):
        load_keras_model(tmp_path / "io")
    assert not target.exists()


def test_a_file_named_h5_that_is_an_archive_is_refused(tmp_path):
    dense_model().save(tmp_path / "model.keras")
    (tmp_path / "model.keras").rename(tmp_path / "model.h5")
    with pytest.raises(UnsafeModelError, match=re.escape("by name and content")):
        check_model_file(tmp_path / "model.h5")


# --------------------------------------------------------------------------- config rules


def _dense_config() -> dict[str, Any]:
    return json.loads(dense_model().to_json())


def _set(path: list[Any], value: Any) -> Any:
    def change(config: dict[str, Any]) -> None:
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


FIRST_DENSE = ["config", "layers", 1]
REFUSED_CONFIGS = {
    "module-import": ([*FIRST_DENSE, "module"], "os", "module 'os'"),
    "registered-name": ([*FIRST_DENSE, "registered_name"], "tenant>Evil", "registered_name"),
    "activation-name": ([*FIRST_DENSE, "config", "activation"], "deserialize", "'deserialize'"),
    "function-module": (
        [*FIRST_DENSE, "config", "activation"],
        {"module": "os", "class_name": "function", "config": "system", "registered_name": None},
        "function module 'os'",
    ),
    "lambda-object": (
        [*FIRST_DENSE, "config", "kernel_initializer"],
        {"class_name": "__lambda__", "config": {"value": "x"}},
        "a Python lambda",
    ),
    "unknown-initializer": (
        [*FIRST_DENSE, "config", "kernel_initializer"],
        {"module": "keras.initializers", "class_name": "Evil", "config": {}},
        "'Evil'",
    ),
    "custom-optimizer-prefix": (["class_name"], "Custom>Marking", "'Custom>Marking'"),
    "function-not-a-name": (
        [*FIRST_DENSE, "config", "activation"],
        {"module": "builtins", "class_name": "function", "config": {"x": 1}},
        "function {'x': 1}",
    ),
    "type-spec-not-a-name": (
        [*FIRST_DENSE, "config", "kernel_initializer"],
        {"class_name": "__typespec__", "spec_name": ["x"], "config": {}},
        "type spec ['x']",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CONFIGS))
def test_config_fields_that_import_or_resolve_code_are_refused(case):
    path, value, message = REFUSED_CONFIGS[case]
    config = _dense_config()
    _set(path, value)(config)
    with pytest.raises(UnsafeModelError, match=re.escape(message)):
        check_keras_config(config, "model.keras")


@pytest.mark.parametrize("name", ["loss.keras", "loss.h5"])
def test_a_custom_loss_is_refused_when_the_model_comes_back_compiled(tmp_path, name):
    @tf_keras.saving.register_keras_serializable(package="tenant")
    def sneaky_loss(y_true: Any, y_pred: Any) -> Any:
        return tf.reduce_mean(y_pred - y_true)

    model = dense_model(compiled=False)
    model.compile(optimizer="adam", loss=sneaky_loss)
    model.save(tmp_path / name)
    with pytest.raises(UnsafeModelError, match=re.escape("'tenant>sneaky_loss'")):
        load_keras_model(tmp_path / name, compile=True)
    # for inference the loader drops the loss, and so does the check
    assert load_keras_model(tmp_path / name, compile=False).output_shape == (None, 1)


# --------------------------------------------------------------------------- other paths


def test_a_registry_bundle_with_a_lambda_fails_to_load_as_a_bundle_error(tmp_path, marker):
    """What a Serve replica or a batch prediction meets when an unsafe bundle was written
    into storage behind the API's back."""
    from mlaas4hep.bundle import BundleError, load_bundle

    lambda_model_file(tmp_path / "model.h5", marker)
    (tmp_path / "params.json").write_text(json.dumps({"name": "evil", "model": "model.h5"}))
    with pytest.raises(BundleError, match=re.escape("model.h5 (model_config): layer 'lambda'")):
        load_bundle(tmp_path, "evil", 1)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["folder", "registry"])
def test_batch_predictions_refuse_an_unsafe_bundle_before_any_actor_loads_it(
    tmp_path, marker, where
):
    from mlaas4hep.bundle import BundleError
    from mlaas4hep.serve.batch_predict import find_bundle
    from mlaas4hep.store.registry import ModelRegistry
    from mlaas4hep.store.storage import Storage

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    lambda_model_file(bundle / "model.h5", marker)
    (bundle / "params.json").write_text(json.dumps({"name": "evil", "model": "model.h5"}))
    storage = Storage(str(tmp_path / "storage"))
    ModelRegistry(storage).register("evil", bundle, owner="mallory")
    with pytest.raises(BundleError, match=re.escape("layer 'lambda' (Lambda)")):
        find_bundle(str(bundle) if where == "folder" else "evil", storage)
    assert not marker.exists()


def test_keras_3_configs_follow_the_same_rules(tmp_path, marker):
    import keras

    inputs = keras.Input((3,))
    hidden = keras.layers.Dropout(0.1)(keras.layers.Dense(4, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=[keras.metrics.AUC()])
    model.save(tmp_path / "k3.keras")
    check_model_file(tmp_path / "k3.keras")
    keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2)]).save(
        tmp_path / "k3-lambda.keras"
    )
    with pytest.raises(UnsafeModelError, match=re.escape("(Lambda)")):
        check_model_file(tmp_path / "k3-lambda.keras")


def test_an_operator_can_opt_in_to_lambda_layers_and_then_they_run(tmp_path, marker):
    path = lambda_model_file(tmp_path / "trusted.keras", marker)
    load_keras_model(path, allowed=["Lambda"])
    assert marker.exists()
