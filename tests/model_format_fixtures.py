"""One small Dense model saved the five ways TensorFlow users bring models, as bundles.

``tests/conftest.py`` registers the fixture for the whole suite; test modules import the
helpers directly (PYTEST_DONT_REWRITE: no asserts here).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

N_FEATURES = 4
#: Rows every format is checked on (a few saturating ones too).
X = (np.random.default_rng(13).normal(size=(5, N_FEATURES)) * [1, 1, 3, 9]).astype(np.float32)
#: The five formats, by the name params.json's ``format`` and ``/params`` give them.
FORMATS = ("graphdef", "savedmodel", "keras", "tf_keras", "onnx")
#: The model file (or folder) each format is bundled as.
MODEL_FILES = {
    "graphdef": "model.pb",
    "savedmodel": "saved_model",
    "keras": "model.keras",
    "tf_keras": "model.h5",
    "onnx": "model.onnx",
}
#: Node names of the frozen graph, as TFaaS's own workflow names them.
GRAPH_INPUT, GRAPH_OUTPUT = "dense_1_input", "output_node0"


@dataclass(frozen=True)
class FormatBundles:
    """Bundle folders by format and the original model's outputs on :data:`X`."""

    folders: dict[str, Path]
    expected: np.ndarray


def dense_model(seed: int = 3, n_features: int = N_FEATURES) -> object:
    """A tf_keras ``Sequential`` n_features -> 8 (relu) -> 2 (softmax) Dense model."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    return tf_keras.Sequential(
        [
            tf_keras.layers.Input(shape=(n_features,), name="features"),
            tf_keras.layers.Dense(8, activation="relu"),
            tf_keras.layers.Dense(2, activation="softmax", name="scores"),
        ]
    )


def keras3_copy(model: object) -> object:
    """The same network built and weighted with Keras 3."""
    import keras

    copy = keras.Sequential(
        [
            keras.Input(tuple(model.input_shape[1:]), name="features"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2, activation="softmax", name="scores"),
        ]
    )
    copy.set_weights(model.get_weights())
    return copy


def save_model(model: object, fmt: str, target: Path) -> None:
    """Save the tf_keras ``model`` at ``target`` in format ``fmt``."""
    import tensorflow as tf

    width = int(model.input_shape[-1])
    spec = tf.TensorSpec([None, width], tf.float32, name="features")
    if fmt == "tf_keras":
        model.save(target)
    elif fmt == "keras":
        keras3_copy(model).save(target)
    elif fmt == "savedmodel":
        serve = tf.function(lambda features: {"scores": model(features)}, input_signature=[spec])
        module = tf.Module()
        module.model = model
        tf.saved_model.save(module, str(target), signatures={"serving_default": serve})
    elif fmt == "graphdef":
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        call = tf.function(lambda x: tf.identity(model(x), name=GRAPH_OUTPUT))
        concrete = call.get_concrete_function(
            tf.TensorSpec([None, width], tf.float32, name=GRAPH_INPUT)
        )
        frozen = convert_variables_to_constants_v2(concrete)
        target.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    else:
        import tf2onnx

        proto, _ = tf2onnx.convert.from_keras(model, input_signature=[spec], opset=13)
        target.write_bytes(proto.SerializeToString())


def write_format_bundle(model: object, fmt: str, folder: Path, name: str) -> Path:
    """A bundle named ``name`` of ``model`` saved as ``fmt`` in ``folder``; TFaaS params
    name the model file (and the frozen graph's nodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, fmt, folder / MODEL_FILES[fmt])
    params = {"name": name, "model": MODEL_FILES[fmt], "labels": "labels.txt"}
    if fmt == "graphdef":
        params.update(inputNode=GRAPH_INPUT, outputNode=GRAPH_OUTPUT)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "labels.txt").write_text("background\nsignal\n")
    return folder


def bundle_files(folder: Path, top: str = "") -> dict[str, bytes]:
    """Every file below ``folder`` (SavedModel folders too) by tarball path."""
    prefix = f"{top}/" if top else ""
    return {
        prefix + p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def format_bundles(tmp_path_factory: pytest.TempPathFactory) -> FormatBundles:
    """The one Dense model as a bundle of each of :data:`FORMATS` (named ``fmt-<format>``)."""
    model = dense_model()
    root = tmp_path_factory.mktemp("formats")
    folders = {
        fmt: write_format_bundle(model, fmt, root / fmt, f"fmt-{fmt.replace('_', '-')}")
        for fmt in FORMATS
    }
    return FormatBundles(folders, np.asarray(model(X, training=False)))
