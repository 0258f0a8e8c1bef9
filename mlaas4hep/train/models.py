"""User models: MLaaS4HEP model files (``model(idim)``) and the declarative MLP.

A model file is plain Python defining ``model(idim)`` that returns a compiled Keras
model, written against the Keras 2 API (``from tensorflow import keras``). Training runs
on legacy Keras (``tf_keras``): Keras 3 cannot train under ``MultiWorkerMirroredStrategy``
in Ray Train, so ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported.

:func:`~mlaas4hep.train.model_file.check_model_file` only parses a file (safe to call in
the API process). A model file is never executed here: :func:`model_archive` runs it in the sandbox
(:mod:`mlaas4hep.train.sandbox`), which hands back the model as a ``.keras`` archive
(config + weights + compile config), and :func:`build_model` loads such an archive in
safe mode (custom layers and ``Lambda`` refused).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mlaas4hep.spec import MLPSpec, ModelSpec
from mlaas4hep.train.model_file import read_model_source
from mlaas4hep.train.sandbox import build_model_archive, load_model_archive

# Must precede any TensorFlow import of this process (tf.keras then means tf_keras).
os.environ["TF_USE_LEGACY_KERAS"] = "1"

if TYPE_CHECKING:
    import tf_keras


def mlp_model(mlp: MLPSpec, idim: int) -> tf_keras.Model:
    """Build and compile the declarative MLP: hidden layers, one sigmoid output."""
    import tf_keras

    layers: list[Any] = [tf_keras.Input(shape=(idim,), name="features")]
    for size in mlp.layers:
        layers.append(tf_keras.layers.Dense(size, activation=mlp.activation))
        if mlp.dropout > 0:
            layers.append(tf_keras.layers.Dropout(mlp.dropout))
    layers.append(tf_keras.layers.Dense(1, activation="sigmoid", name="score"))
    model = tf_keras.Sequential(layers, name="mlp")
    optimizers = {
        "adam": tf_keras.optimizers.Adam,
        "sgd": tf_keras.optimizers.SGD,
        "rmsprop": tf_keras.optimizers.RMSprop,
        "adamw": tf_keras.optimizers.AdamW,
    }
    model.compile(
        optimizer=optimizers[mlp.optimizer](learning_rate=mlp.learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def model_archive(
    model_spec: ModelSpec, idim: int, *, source: str | None = None, seed: int | None = None
) -> bytes:
    """Build the model of model file ``model_spec.file`` for ``idim`` in the sandbox.

    ``source`` is the file's text when it was read elsewhere; ``seed`` seeds the random
    state its initial weights are drawn from. Returns the model's ``.keras`` archive
    bytes; :class:`~mlaas4hep.train.model_file.ModelSourceError` naming the file and line
    when the file gives no compiled model.
    """
    if not model_spec.file:
        raise ValueError("model_archive needs a model file (the declarative MLP is built here)")
    if source is None:
        source = read_model_source(model_spec.file)
    return build_model_archive(source, model_spec.file, idim, model_spec.kwargs, seed=seed)


def build_model(
    model_spec: ModelSpec, idim: int, *, archive: bytes | None = None
) -> tf_keras.Model:
    """Return the compiled model of ``model_spec`` for ``idim`` input features.

    A model file's model is loaded in safe mode from ``archive`` (what
    :func:`model_archive` returned: Train workers and Tune trials get these bytes, never
    the source), or built in the sandbox first when no archive is given. Raises
    :class:`~mlaas4hep.modelfiles.safety.UnsafeModelError` naming a refused layer.
    """
    if model_spec.file:
        if archive is None:
            archive = model_archive(model_spec, idim)
        return load_model_archive(archive, model_spec.file)
    return mlp_model(model_spec.mlp or MLPSpec(), idim)
