"""Hostile model files for the safe-model tests: each writes a marker file if any of its
code runs (a Lambda when it is called or deserialized, a custom layer when it is built).

Imported directly by the test modules; the helpers hold no asserts (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras


def marking_lambda(marker: Path) -> Any:
    """A Lambda layer named ``lambda`` whose function writes ``marker`` whenever it runs
    (tracing included)."""
    return tf_keras.layers.Lambda(
        lambda t, p=str(marker): (open(p, "w").close(), t * 2.0)[1], name="lambda"
    )


@tf_keras.saving.register_keras_serializable(package="tenant")
class Marking(tf_keras.layers.Layer):
    """A custom layer known only to the test process: building it writes its marker."""

    def __init__(self, marker: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        if marker:
            Path(marker).write_text("ran")

    def call(self, inputs: Any) -> Any:
        return inputs

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "marker": self.marker}


def hostile_sequential(layer: Any, n_features: int = 3) -> Any:
    """``Input -> layer -> Dense(1)``."""
    return tf_keras.Sequential(
        [tf_keras.layers.Input(shape=(n_features,)), layer, tf_keras.layers.Dense(1)]
    )


def lambda_model_file(path: Path, marker: Path, n_features: int = 3) -> Path:
    """Save a model with :func:`marking_lambda` to ``path`` (its suffix picks the format);
    the marker its building wrote is removed. Returns ``path``."""
    hostile_sequential(marking_lambda(marker), n_features).save(path)
    marker.unlink(missing_ok=True)
    return path


def custom_layer_model_file(path: Path, marker: Path, n_features: int = 3) -> Path:
    """Save a model with a :class:`Marking` layer named ``marking`` to ``path``; the marker
    its building wrote is removed. Returns ``path``."""
    hostile_sequential(Marking(str(marker), name="marking"), n_features).save(path)
    marker.unlink(missing_ok=True)
    return path
