"""User models: MLaaS4HEP model files (``model(idim)``) and the declarative MLP.

A model file is plain Python defining ``model(idim)`` that returns a compiled Keras
model, written against the Keras 2 API (``from tensorflow import keras``). Training runs
on legacy Keras (``tf_keras``): Keras 3 cannot train under ``MultiWorkerMirroredStrategy``
in Ray Train, so ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported.

:func:`check_model_file` only parses a file (safe to call in the API process);
:func:`build_model` runs it and belongs in Ray jobs and Train workers.
"""

from __future__ import annotations

import ast
import os
import sys
import traceback
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlaas4hep.platform.config import MLPSpec, ModelSpec

# Must precede any TensorFlow import of this process (tf.keras then means tf_keras).
os.environ["TF_USE_LEGACY_KERAS"] = "1"

if TYPE_CHECKING:
    import tf_keras

#: Name of the function a model file must define.
MODEL_FUNCTION = "model"


class ModelFileError(ValueError):
    """A model file that cannot give a model; the message names the file and the line."""


def _syntax_error(path: str, error: SyntaxError) -> ModelFileError:
    where = f"{path}, line {error.lineno}" if error.lineno else path
    return ModelFileError(f"{where}: syntax error: {error.msg}")


def _parse(source: str, path: str) -> ast.Module:
    try:
        tree = ast.parse(source, filename=path)
        compile(tree, path, "exec")  # catches errors ast accepts ('return' outside function...)
    except SyntaxError as error:
        raise _syntax_error(path, error) from None
    except ValueError as error:  # null bytes
        raise ModelFileError(f"{path}: not a Python source file: {error}") from None
    return tree


def _check_model_function(tree: ast.Module, path: str) -> None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == MODEL_FUNCTION:
            args = node.args
            positional = len(args.posonlyargs) + len(args.args)
            if positional == 0 and args.vararg is None:
                raise ModelFileError(
                    f"{path}, line {node.lineno}: {MODEL_FUNCTION}() must take the input "
                    f"dimension: def {MODEL_FUNCTION}(idim)"
                )
            return
    raise ModelFileError(
        f"{path}: no top-level function {MODEL_FUNCTION}(idim) returning a compiled Keras model"
    )


def check_model_file(path: str | Path) -> None:
    """Check a model file without running it: it parses and defines ``model(idim)``.

    Raises :class:`ModelFileError` naming the file (and line) otherwise.
    """
    path = str(path)
    source = read_model_source(path)
    _check_model_function(_parse(source, path), path)


def read_model_source(path: str | Path) -> str:
    """Return the text of a model file; :class:`ModelFileError` if it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: cannot read model file: {error}") from None


def _line_in(error: BaseException, path: str) -> int | None:
    """Deepest line of ``path`` in the traceback of ``error`` (None if the file is not in it)."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return line


def _user_error(error: BaseException, path: str, doing: str) -> ModelFileError:
    line = _line_in(error, path)
    where = f"{path}, line {line}" if line else path
    return ModelFileError(f"{where}: {doing} raised {type(error).__name__}: {error}")


def load_model_function(source: str, path: str) -> types.FunctionType:
    """Execute model-file ``source`` (reported as ``path``) and return its ``model`` function."""
    tree = _parse(source, path)
    _check_model_function(tree, path)
    module = types.ModuleType(f"mlaas4hep_user_model_{abs(hash(path))}")
    module.__file__ = path
    code = compile(tree, path, "exec")
    # The module must be importable by name while it runs (dataclasses, pickling, ...).
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except Exception as error:
        raise _user_error(error, path, "importing the model file") from error
    finally:
        sys.modules.pop(module.__name__, None)
    function = module.__dict__.get(MODEL_FUNCTION)
    if not callable(function):
        raise ModelFileError(f"{path}: '{MODEL_FUNCTION}' is not a function")
    return function


def model_from_source(
    source: str, path: str, idim: int, kwargs: dict[str, Any] | None = None
) -> tf_keras.Model:
    """Run ``model(idim, **kwargs)`` of model-file ``source``; check it returns a compiled model."""
    import tf_keras

    function = load_model_function(source, path)
    line = getattr(getattr(function, "__code__", None), "co_firstlineno", None)
    where = f"{path}, line {line}" if line else path
    call = ", ".join([str(idim), *(f"{k}={v!r}" for k, v in (kwargs or {}).items())])
    try:
        model = function(idim, **(kwargs or {}))
    except Exception as error:
        raise _user_error(error, path, f"{MODEL_FUNCTION}({call})") from error
    if not isinstance(model, tf_keras.Model):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        hint = (
            " (a Keras 3 model: build it with `from tensorflow import keras`)"
            if kind.startswith("keras.")
            else ""
        )
        raise ModelFileError(
            f"{where}: {MODEL_FUNCTION}({idim}) returned {kind}{hint}, expected a compiled "
            "tf.keras Model"
        )
    if not getattr(model, "_is_compiled", False) or model.optimizer is None:
        raise ModelFileError(
            f"{where}: {MODEL_FUNCTION}({idim}) returned a model that is not compiled; "
            "call model.compile(loss=..., optimizer=...) before returning it"
        )
    return model


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


def build_model(model_spec: ModelSpec, idim: int, *, source: str | None = None) -> tf_keras.Model:
    """Return the compiled model of ``model_spec`` for ``idim`` input features.

    ``source`` is the model file's text when it was read elsewhere (Train workers get
    the text, not the path, so they need no shared filesystem).
    """
    if model_spec.file:
        if source is None:
            source = read_model_source(model_spec.file)
        return model_from_source(source, model_spec.file, idim, model_spec.kwargs)
    return mlp_model(model_spec.mlp or MLPSpec(), idim)
