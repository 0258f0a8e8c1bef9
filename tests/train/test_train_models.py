"""User model files (MLaaS4HEP ``model(idim)``) and the declarative MLP; no Ray needed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlaas4hep.spec import MLPSpec, ModelSpec
from mlaas4hep.train.model_file import ModelSourceError, check_model_file
from mlaas4hep.train.models import build_model

KERAS2_MODEL = """\
from tensorflow import keras

def model(idim):
    model = keras.Sequential([
        keras.layers.Dense(64, activation='relu', input_shape=(idim,)),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(32, activation='relu'),
        keras.layers.Dense(1, activation='sigmoid'),
    ])
    model.compile(loss='binary_crossentropy', optimizer='adam', metrics=['accuracy'])
    return model
"""

TF_KERAS_MODEL = """\
import tensorflow as tf

def model(idim):
    inputs = tf.keras.Input(shape=(idim,))
    hidden = tf.keras.layers.Dense(8, activation='tanh')(inputs)
    outputs = tf.keras.layers.Dense(1, activation='sigmoid')(hidden)
    model = tf.keras.Model(inputs, outputs)
    model.compile(loss='binary_crossentropy', optimizer=tf.keras.optimizers.SGD(0.1))
    return model
"""


def write(tmp_path: Path, text: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("source", [KERAS2_MODEL, TF_KERAS_MODEL], ids=["keras", "tf.keras"])
def test_mlaas4hep_model_file_builds_unchanged(tmp_path, source):
    import tf_keras

    path = write(tmp_path, source)
    check_model_file(path)
    model = build_model(ModelSpec(file=str(path)), 7)
    assert isinstance(model, tf_keras.Model)
    assert model.optimizer is not None
    assert model.inputs[0].shape[-1] == 7
    scores = model(np.zeros((3, 7), dtype=np.float32)).numpy()
    assert scores.shape == (3, 1)


def test_declarative_mlp_builds_compiled_model_without_file():
    spec = ModelSpec(mlp=MLPSpec(layers=[12, 6], dropout=0.2, optimizer="sgd", learning_rate=0.05))
    model = build_model(spec, 5)
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert [layer.units for layer in dense] == [12, 6, 1]
    assert sum(layer.__class__.__name__ == "Dropout" for layer in model.layers) == 2
    assert dense[-1].activation.__name__ == "sigmoid"
    assert type(model.optimizer).__name__ == "SGD"
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert model.loss == "binary_crossentropy"


def test_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "from tensorflow import keras\n\ndef model(idim)\n    return None\n")
    for check in (
        lambda: check_model_file(path),
        lambda: build_model(ModelSpec(file=str(path)), 3),
    ):
        with pytest.raises(ModelSourceError, match=rf"{path}, line 3: syntax error"):
            check()


def test_exception_on_import_names_file_and_line(tmp_path):
    path = write(tmp_path, "import math\nx = 1\nvalue = math.sqrt('a')\ndef model(idim):\n  pass\n")
    check_model_file(path)  # parses fine: the error only shows when the file runs
    with pytest.raises(ModelSourceError) as info:
        build_model(ModelSpec(file=str(path)), 3)
    message = str(info.value)
    assert f"{path}, line 3" in message
    assert "importing the model file raised TypeError" in message


def test_missing_model_function_is_reported(tmp_path):
    path = write(tmp_path, "def build(idim):\n    return None\n")
    with pytest.raises(ModelSourceError, match=r"model\.py: no top-level function model\(idim\)"):
        check_model_file(path)
    with pytest.raises(ModelSourceError, match=r"no top-level function model\(idim\)"):
        build_model(ModelSpec(file=str(path)), 3)


def test_model_function_without_input_dimension_is_reported(tmp_path):
    path = write(tmp_path, "# a model\n\ndef model():\n    return None\n")
    with pytest.raises(ModelSourceError, match=rf"{path}, line 3: model\(\) must take the input"):
        check_model_file(path)


def test_model_not_compiled_names_the_function_line(tmp_path):
    path = write(
        tmp_path,
        """\
        from tensorflow import keras

        def model(idim):
            return keras.Sequential([keras.layers.Dense(1, input_shape=(idim,))])
        """,
    )
    with pytest.raises(ModelSourceError, match=rf"{path}, line 3: model\(4\) .* not compiled"):
        build_model(ModelSpec(file=str(path)), 4)


def test_model_returning_something_else_is_reported(tmp_path):
    path = write(tmp_path, "def model(idim):\n    return [idim]\n")
    with pytest.raises(ModelSourceError, match=r"line 1: model\(4\) returned builtins.list"):
        build_model(ModelSpec(file=str(path)), 4)


def test_error_inside_model_function_names_its_line(tmp_path):
    path = write(
        tmp_path,
        """\
        from tensorflow import keras

        def model(idim):
            layer = keras.layers.Dense(idim)
            return layer.no_such_method()
        """,
    )
    with pytest.raises(ModelSourceError) as info:
        build_model(ModelSpec(file=str(path)), 4)
    assert f"{path}, line 5: model(4) raised AttributeError" in str(info.value)


def test_check_model_file_does_not_run_user_code(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef model(idim):\n    pass\n")
    check_model_file(path)
    assert not marker.exists()


def test_missing_model_file_is_reported(tmp_path):
    with pytest.raises(ModelSourceError, match=r"nope\.py: model file not found"):
        check_model_file(tmp_path / "nope.py")
    with pytest.raises(ModelSourceError, match=r"nope\.py: model file not found"):
        build_model(ModelSpec(file=str(tmp_path / "nope.py")), 2)
