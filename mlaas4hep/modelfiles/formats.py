"""Model formats: one loader per format a TensorFlow user brings, one :class:`Predictor`.

=============  ==============================================  ================================
format         file (params.json ``model``)                    loaded with
=============  ==============================================  ================================
``tf_keras``   ``.h5``/``.hdf5``, ``.keras`` of Keras 2.x       tf_keras, safe mode; a Dense
                                                               stack runs as numpy
``keras``      ``.keras`` of Keras 3.x (metadata.json)         Keras 3, safe mode
``savedmodel`` a folder with ``saved_model.pb``                ``tf.saved_model.load``, its
                                                               ``serving_default`` signature
``graphdef``   a frozen graph ``.pb`` + ``inputNode``/          ``tf.compat.v1`` graph import
               ``outputNode``                                  as a concrete function
``onnx``       ``.onnx``                                       onnxruntime (CPU)
=============  ==============================================  ================================

The format is judged by the file's content and name, and must equal params.json's
``format`` when it gives one (:func:`mlaas4hep.modelfiles.safety.model_format`). Every
file is checked by :func:`~mlaas4hep.modelfiles.safety.check_model_file` before its
loader sees it (allow-listed Keras layers, no file/Python ops in TensorFlow graphs, only
stateless ops in frozen graphs, only standard ONNX domains), and no loader runs code
from the file. Every model has one input ``[rows, ...]`` and one output; a file that
does not load as its format raises :class:`ModelFileError` naming it and what was
expected. TensorFlow and onnxruntime are imported by the loaders, not by this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlaas4hep.modelfiles.safety import (
    MODEL_FORMATS,
    check_model_file,
    load_checked_keras3,
    load_checked_tf_keras,
    operator_allowed_layers,
)

Forward = Callable[[np.ndarray], np.ndarray]

#: KServe v2 ``platform`` of each format (Triton's names where Triton has one).
PLATFORMS = {
    "tf_keras": "tensorflow_keras",
    "keras": "keras",
    "savedmodel": "tensorflow_savedmodel",
    "graphdef": "tensorflow_graphdef",
    "onnx": "onnxruntime_onnx",
}


class ModelFileError(ValueError):
    """A model file that does not load as its format; the message names the file and
    what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    """One model tensor: its name in the model and its shape (rows first; None: any)."""

    name: str
    shape: tuple[int | None, ...]

    def describe(self) -> dict[str, Any]:
        """``{"name", "datatype", "shape"}`` with -1 for a dimension of any size."""
        return {
            "name": self.name,
            "datatype": "FP32",
            "shape": [-1 if d is None else int(d) for d in self.shape],
        }


@dataclass(frozen=True)
class Predictor:
    """A loaded model of one format: its input and output tensors and ``call``, which
    takes a float32 batch of the input's shape and returns the outputs as an array."""

    format: str
    input: TensorInfo
    output: TensorInfo
    call: Forward

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for the float32 batch ``x``."""
        return self.call(x)

    def describe(self) -> dict[str, Any]:
        """Format, KServe platform and input/output tensors, for ``/params`` and metadata."""
        return {
            "format": self.format,
            "platform": PLATFORMS[self.format],
            "inputs": [self.input.describe()],
            "outputs": [self.output.describe()],
        }


def load_predictor(
    path: Path,
    params: dict[str, Any],
    numpy_dense: bool = True,
    allowed: Collection[str] | None = None,
) -> Predictor:
    """The model file or folder ``path`` of a bundle with TFaaS ``params``, checked and
    loaded as its format (``params["format"]``, when given, must match); ``numpy_dense``:
    run a tf_keras/Keras 3 ``Sequential`` Dense stack in numpy; ``allowed``: extra Keras
    layer classes (None: the operator's setting). Raises
    :class:`~mlaas4hep.modelfiles.safety.UnsafeModelError` for an unsafe or mismatched
    file and :class:`ModelFileError` for one its format's loader cannot use."""
    allowed = operator_allowed_layers() if allowed is None else allowed
    kind = check_model_file(path, allowed, compile=False, declared=params.get("format") or None)
    try:
        return LOADERS[kind](path, params, numpy_dense, allowed)
    except ModelFileError:
        raise
    except Exception as error:  # each runtime raises its own types for a corrupt file
        raise ModelFileError(
            f"model file {path.name!r} cannot be loaded as {MODEL_FORMATS[kind]}: {error}"
        ) from None


# --------------------------------------------------------------------------- Keras


def load_tf_keras(
    path: Path, params: dict[str, Any], numpy_dense: bool, allowed: Collection[str]
) -> Predictor:
    """A tf_keras ``.h5``/``.keras`` model (or a tf_keras SavedModel folder)."""
    import tf_keras

    model = load_checked_tf_keras(path, "tf_keras", compile=False, allowed=allowed)
    return _keras_predictor(model, "tf_keras", tf_keras, numpy_dense, path)


def load_keras3(
    path: Path, params: dict[str, Any], numpy_dense: bool, allowed: Collection[str]
) -> Predictor:
    """A Keras 3 ``.keras`` archive, loaded with Keras 3."""
    import keras

    model = load_checked_keras3(path, "keras", allowed)
    return _keras_predictor(model, "keras", keras, numpy_dense, path)


def _keras_predictor(model: Any, fmt: str, module: Any, numpy_dense: bool, path: Path) -> Predictor:
    """The :class:`Predictor` of a loaded Keras ``model`` of ``module`` (tf_keras or
    Keras 3): its numpy Dense forward pass or its traced graph."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelFileError(
            f"model file {path.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs; one of each is served"
        )
    names = getattr(model, "input_names", None) or [t.name for t in model.inputs]
    shape_in = tuple(model.inputs[0].shape)
    shape_out = tuple(model.outputs[0].shape)
    call = (numpy_dense and _dense_forward(model, module)) or _compiled(model, shape_in[1:])
    return Predictor(
        fmt,
        TensorInfo(str(names[0]), shape_in),
        TensorInfo(_keras_output_name(model), shape_out),
        call,
    )


def _keras_output_name(model: Any) -> str:
    """The name of a Keras model's output: tf_keras ``output_names``, else the Keras 3
    layer that produces it."""
    names = getattr(model, "output_names", None)
    if names:
        return str(names[0])
    history = getattr(model.outputs[0], "_keras_history", None)
    operation = getattr(history, "operation", None)
    return str(getattr(operation, "name", None) or model.outputs[0].name)


def _compiled(model: Any, row_shape: tuple[int | None, ...]) -> Forward:
    """``model(x)`` as one traced graph for any number of rows (about 2x faster than eager)."""
    import tensorflow as tf

    def call(x: Any) -> Any:
        return model(x, training=False)

    signature = [tf.TensorSpec([None, *row_shape], tf.float32)]
    graph = tf.function(call, input_signature=signature, autograph=False)
    return lambda x: graph(x).numpy()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-z) overflows to inf for z << 0: the answer is 0
        return 1.0 / (1.0 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


#: Activations of :func:`_dense_forward`, by Keras name.
DENSE_ACTIVATIONS: dict[str, Forward] = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "softmax": _softmax,
}


def _dense_forward(model: Any, module: Any) -> Forward | None:
    """``model(x)`` in float32 numpy when ``model`` is a ``Sequential`` stack of ``Dense``
    (and inference-time no-op ``Dropout``) layers of the Keras ``module`` (tf_keras or
    Keras 3) with the activations of :data:`DENSE_ACTIVATIONS`; else None.

    A single row costs microseconds this way against about 0.4 ms through TensorFlow, which
    is most of a small model's serving time; the outputs agree with ``model(x)`` to float32
    rounding.
    """
    if not isinstance(model, module.Sequential):
        return None
    steps: list[tuple[np.ndarray, np.ndarray | None, Forward]] = []
    for layer in model.layers:
        if type(layer) is module.layers.Dropout:
            continue
        if type(layer) is not module.layers.Dense or layer.dtype != "float32":
            return None
        if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
            return None  # Keras 3 quantized or LoRA kernels are not one plain matrix
        activation = DENSE_ACTIVATIONS.get(getattr(layer.activation, "__name__", ""))
        weights = layer.get_weights()
        if activation is None or len(weights) != (2 if layer.use_bias else 1):
            return None
        steps.append((weights[0], weights[1] if layer.use_bias else None, activation))
    if not steps:
        return None

    def forward(x: np.ndarray) -> np.ndarray:
        for kernel, bias, activation in steps:
            x = x @ kernel
            if bias is not None:
                x += bias
            x = activation(x)
        return x

    return forward


# --------------------------------------------------------------------------- TensorFlow graphs


def load_savedmodel(
    path: Path, params: dict[str, Any], numpy_dense: bool, allowed: Collection[str]
) -> Predictor:
    """A SavedModel folder through its ``serving_default`` signature (one input, one
    output; names and shapes from the signature). A tf_keras SavedModel (with
    ``keras_metadata.pb``) loads as tf_keras, so its Dense stack keeps the numpy path."""
    import tensorflow as tf

    if (path / "keras_metadata.pb").is_file():
        return load_tf_keras(path, params, numpy_dense, allowed)
    loaded = tf.saved_model.load(str(path))
    signatures = dict(loaded.signatures)
    if "serving_default" not in signatures:
        raise ModelFileError(
            f"SavedModel {path.name!r} has no 'serving_default' signature "
            f"(signatures: {', '.join(signatures) or 'none'})"
        )
    signature = signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    inputs = {**{f"input_{i}": spec for i, spec in enumerate(args)}, **kwargs}
    outputs = signature.structured_outputs
    if len(inputs) != 1 or not isinstance(outputs, dict) or len(outputs) != 1:
        raise ModelFileError(
            f"SavedModel {path.name!r}: signature 'serving_default' takes "
            f"{sorted(inputs)} and gives {sorted(outputs) if isinstance(outputs, dict) else '?'}"
            "; one input and one output tensor are served"
        )
    (in_name, in_spec), (out_name, out_spec) = (
        next(iter(inputs.items())),
        next(iter(outputs.items())),
    )
    if not in_spec.dtype.is_floating:
        raise ModelFileError(
            f"SavedModel {path.name!r}: input {in_name!r} is {in_spec.dtype.name}, not a float"
        )
    dtype = in_spec.dtype

    def call(x: np.ndarray) -> np.ndarray:
        return signature(**{in_name: tf.constant(x, dtype=dtype)})[out_name].numpy()

    return Predictor(
        "savedmodel",
        TensorInfo(in_name, tuple(in_spec.shape.as_list())),
        TensorInfo(out_name, tuple(out_spec.shape.as_list())),
        call,
    )


def load_graphdef(
    path: Path, params: dict[str, Any], numpy_dense: bool, allowed: Collection[str]
) -> Predictor:
    """A frozen graph ``.pb``, fed at params' ``inputNode`` and read at ``outputNode``
    (``name`` or ``name:0``; either may be left out when the graph has a single
    placeholder / a single unconsumed node), imported as one concrete function."""
    import tensorflow as tf

    from mlaas4hep.modelfiles.safety import read_graphdef

    graph_def = read_graphdef(path)
    in_node = _graph_node(graph_def, params.get("inputNode"), "inputNode", path)
    out_node = _graph_node(graph_def, params.get("outputNode"), "outputNode", path)

    def imported() -> None:
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(imported, [])
    graph = wrapped.graph
    feed = graph.get_tensor_by_name(f"{in_node}:0")
    fetch = graph.get_tensor_by_name(f"{out_node}:0")
    if feed.op.type != "Placeholder":
        raise ModelFileError(
            f"model file {path.name!r}: params.json inputNode {in_node!r} is a "
            f"{feed.op.type} node, not a Placeholder"
        )
    function = wrapped.prune(feed, fetch)
    dtype = feed.dtype

    def call(x: np.ndarray) -> np.ndarray:
        return function(tf.constant(x, dtype=dtype)).numpy()

    return Predictor(
        "graphdef",
        TensorInfo(in_node, _dims(feed.shape)),
        TensorInfo(out_node, _dims(fetch.shape)),
        call,
    )


def _dims(shape: Any) -> tuple[int | None, ...]:
    """A TensorFlow shape as a tuple (empty when its rank is unknown)."""
    return tuple(shape.as_list()) if shape.rank is not None else ()


def _graph_node(graph_def: Any, name: Any, key: str, path: Path) -> str:
    """The node that params' ``key`` (``inputNode``/``outputNode``) names in the frozen
    graph, or the only candidate when it names none; :class:`ModelFileError` otherwise."""
    nodes = {node.name: node for node in graph_def.node}
    if key == "inputNode":
        candidates = [n for n, node in nodes.items() if node.op == "Placeholder"]
    else:
        consumed = {i.lstrip("^").split(":")[0] for node in graph_def.node for i in node.input}
        candidates = [n for n, node in nodes.items() if n not in consumed and node.op != "NoOp"]
    shown = ", ".join(candidates[:10]) or "none"
    if not name:
        if len(candidates) == 1:
            return candidates[0]
        raise ModelFileError(
            f"model file {path.name!r} is a frozen graph: params.json must name its "
            f"{key} (candidates: {shown})"
        )
    if not isinstance(name, str):
        raise ModelFileError(f"params.json {key} must be a node name, got {name!r}")
    node, _, index = name.partition(":")
    if node not in nodes or index not in ("", "0"):
        raise ModelFileError(
            f"model file {path.name!r}: params.json {key} {name!r} is not a node of the "
            f"frozen graph (candidates: {shown})"
        )
    return node


# --------------------------------------------------------------------------- ONNX


def load_onnx(
    path: Path, params: dict[str, Any], numpy_dense: bool, allowed: Collection[str]
) -> Predictor:
    """An ONNX model through an onnxruntime CPU session (one float input, one output)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one request's rows; replicas scale out instead
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        path.read_bytes(), options, providers=["CPUExecutionProvider"]
    )
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelFileError(
            f"model file {path.name!r} has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in outputs]}; one input and one output tensor are served"
        )
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64}
    if inputs[0].type not in dtypes:
        raise ModelFileError(
            f"model file {path.name!r}: input {inputs[0].name!r} is {inputs[0].type}, "
            "not tensor(float) or tensor(double)"
        )
    in_name, out_name, dtype = inputs[0].name, outputs[0].name, dtypes[inputs[0].type]

    def call(x: np.ndarray) -> np.ndarray:
        return session.run([out_name], {in_name: x.astype(dtype, copy=False)})[0]

    return Predictor(
        "onnx",
        TensorInfo(in_name, _onnx_dims(inputs[0].shape)),
        TensorInfo(out_name, _onnx_dims(outputs[0].shape)),
        call,
    )


def _onnx_dims(shape: Any) -> tuple[int | None, ...]:
    """An onnxruntime shape (ints, symbolic names or None) with None for any size."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


Loader = Callable[[Path, dict[str, Any], bool, Collection[str]], Predictor]

#: The loader of each format of :data:`~mlaas4hep.modelfiles.safety.MODEL_FORMATS`.
LOADERS: dict[str, Loader] = {
    "tf_keras": load_tf_keras,
    "keras": load_keras3,
    "savedmodel": load_savedmodel,
    "graphdef": load_graphdef,
    "onnx": load_onnx,
}
