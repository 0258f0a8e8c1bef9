"""Inside the model sandbox: run a model file's ``model(idim, **kwargs)``, hand back an archive.

Started by :mod:`mlaas4hep.train.sandbox` as ``python -I -m mlaas4hep.train.sandbox_runner``
inside bubblewrap (no network, no platform home, no Ray token, no storage). It reads one
JSON request from stdin::

    {"source": "...", "path": "model.py", "idim": 28, "kwargs": {}, "seed": 7}

seeds Python, numpy and TensorFlow when a seed is given (the training's seed: the initial
weights are then those the training would draw), executes the source, calls
``model(idim, **kwargs)``, checks that it returned a compiled tf_keras model and writes
to its *original* stdout one JSON header line, then the archive's bytes when the build
succeeded::

    {"ok": true, "size": 12345}\\n<12345 bytes of a tf_keras .keras archive>
    {"ok": false, "error": "model.py, line 4: model(28) raised ..."}\\n

Whatever the user's code prints goes to stderr (fd 1 is pointed there before it runs).
The trusted side never executes any of this module's output: it checks and loads the
archive in safe mode. This module is the only place that executes a model file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import types
from pathlib import Path
from typing import Any

from mlaas4hep.train.model_file import MODEL_FUNCTION, ModelSourceError, parse_model_source

os.environ["TF_USE_LEGACY_KERAS"] = "1"

#: File name of the archive inside the sandbox's private /tmp.
ARCHIVE_NAME = "model.keras"


def _line_in(error: BaseException, path: str) -> int | None:
    """Deepest line of ``path`` in the traceback of ``error`` (None if the file is not in it)."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return line


def _user_error(error: BaseException, path: str, doing: str) -> ModelSourceError:
    """A ModelSourceError for ``error`` raised while ``doing``, naming its line in ``path``."""
    line = _line_in(error, path)
    where = f"{path}, line {line}" if line else path
    return ModelSourceError(f"{where}: {doing} raised {type(error).__name__}: {error}")


def load_model_function(source: str, path: str) -> types.FunctionType:
    """Execute model-file ``source`` (reported as ``path``) and return its ``model`` function."""
    tree = parse_model_source(source, path)
    module = types.ModuleType("mlaas4hep_user_model")
    module.__file__ = path
    code = compile(tree, path, "exec")
    # The module must be importable by name while it runs (dataclasses, pickling, ...).
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except Exception as error:
        raise _user_error(error, path, "importing the model file") from error
    function = module.__dict__.get(MODEL_FUNCTION)
    if not callable(function):
        raise ModelSourceError(f"{path}: '{MODEL_FUNCTION}' is not a function")
    return function


def _check_compiled(model: Any, where: str, idim: int) -> None:
    """ModelSourceError unless ``model`` is a compiled tf_keras Model."""
    # tf_keras is only loaded when the user's code loaded it: anything else cannot be one
    # of its models, and the error is then reported without importing TensorFlow.
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is None or not isinstance(model, tf_keras.Model):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        hint = (
            " (a Keras 3 model: build it with `from tensorflow import keras`)"
            if kind.startswith("keras.")
            else ""
        )
        raise ModelSourceError(
            f"{where}: {MODEL_FUNCTION}({idim}) returned {kind}{hint}, expected a compiled "
            "tf.keras Model"
        )
    if not getattr(model, "_is_compiled", False) or model.optimizer is None:
        raise ModelSourceError(
            f"{where}: {MODEL_FUNCTION}({idim}) returned a model that is not compiled; "
            "call model.compile(loss=..., optimizer=...) before returning it"
        )


def build_archive(
    source: str, path: str, idim: int, kwargs: dict[str, Any], seed: int | None = None
) -> bytes:
    """Run ``model(idim, **kwargs)`` of ``source``; return the model as .keras archive bytes.

    With a ``seed``, random state is seeded first (``tf_keras.utils.set_random_seed``).
    Raises :class:`ModelSourceError` naming ``path`` and the line at fault.
    """
    if seed is not None:
        import tf_keras

        tf_keras.utils.set_random_seed(seed)
    function = load_model_function(source, path)
    line = getattr(getattr(function, "__code__", None), "co_firstlineno", None)
    where = f"{path}, line {line}" if line else path
    call = ", ".join([str(idim), *(f"{k}={v!r}" for k, v in kwargs.items())])
    try:
        model = function(idim, **kwargs)
    except Exception as error:
        raise _user_error(error, path, f"{MODEL_FUNCTION}({call})") from error
    _check_compiled(model, where, idim)
    with tempfile.TemporaryDirectory(prefix="mlaas4hep-archive-") as folder:
        target = Path(folder, ARCHIVE_NAME)
        try:
            model.save(str(target), save_format="keras_v3")  # whatever the user loaded
        except Exception as error:
            raise _user_error(
                error, path, f"saving the model of {MODEL_FUNCTION}({call})"
            ) from None
        return target.read_bytes()


def _answer(stream, header: dict[str, Any], payload: bytes = b"") -> None:
    stream.write(json.dumps(header).encode() + b"\n" + payload)
    stream.flush()


def main() -> int:
    """Read the request from stdin, build, answer on the original stdout; 0 when answered."""
    request = json.loads(sys.stdin.buffer.read())
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's prints go to stderr, never into the answer
    sys.stdout = sys.stderr
    path = str(request.get("path") or "model.py")
    try:
        seed = request.get("seed")
        archive = build_archive(
            str(request["source"]),
            path,
            int(request["idim"]),
            dict(request.get("kwargs") or {}),
            None if seed is None else int(seed),
        )
    except ModelSourceError as error:
        _answer(answer, {"ok": False, "error": str(error)})
    except BaseException as error:  # SystemExit, KeyboardInterrupt... from the user's code
        _answer(answer, {"ok": False, "error": str(_user_error(error, path, "building"))})
    else:
        _answer(answer, {"ok": True, "size": len(archive)}, archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
