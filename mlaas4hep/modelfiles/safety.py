"""Safe model files: check a user's model file (Keras, SavedModel, frozen graph, ONNX)
before any loader sees it.

Every model file a tenant supplies (TFaaS uploads, registry bundles loaded by Serve
replicas and batch predictions, the ``.keras`` archive a sandboxed ``model.py`` hands
back) is data, never code. Keras deserialization can run code in several ways, and
``safe_mode`` covers only one:

* ``Lambda`` layers carry marshalled Python bytecode. tf_keras refuses it only in safe
  mode: ``safe_mode=True`` of the ``.keras`` loader; the ``.h5`` and SavedModel loaders
  take no such argument and honour only an enclosing ``SafeModeScope`` (without one, a
  legacy ``.h5`` runs its Lambda's code).
* every object config names a ``module`` that Keras imports and a ``class_name`` (or
  ``registered_name``) whose ``from_config`` it calls: any importable module, any class
  registered in the process. ``safe_mode`` does not look at them.
* string-valued function fields (``activation``, ``loss``, ``metrics``, ...) are looked
  up in the globals of a Keras module, and ``TFOpLambda`` layers call any TensorFlow
  API function by its path (``io.write_file``, ``py_function``, ``print``, ...).
* a SavedModel's graph runs whatever ops its functions hold when it is called
  (``ReadFile``, ``WriteFile``, ``PyFunc``, dataset readers, summary writers, ...).

So this module walks the model's config (read from the archive's ``config.json`` or the
``.h5``'s ``model_config`` attribute with h5py, never through a Keras loader) and the
SavedModel graph, and refuses what is not on its allow-lists with
:class:`UnsafeModelError` naming the file, the layer and the rule. Only then
:func:`load_keras_model` loads the file with tf_keras in safe mode.

The rules:

* object classes: the built-in Keras layers, models, initializers, regularizers,
  constraints, optimizers (and learning-rate schedules), losses, metrics and dtype
  policies below; ``Lambda``, layers that read files or other models (lookup and text
  layers with vocabulary files, ``DenseFeatures``, ``TFSMLayer``) and everything else
  are refused. An operator can allow-list layer class names (setting
  ``allowed_model_layers``): those pass with any ``module`` (the operator's package must
  be installed and register them with Keras); allow-listing ``Lambda`` turns safe mode
  off for that load, which runs the file's bytecode: only for trusted files.
* ``module``: absent, ``builtins`` (functions), ``keras``/``tf_keras`` and their
  submodules, or ``tensorflow.*`` for tensor specs.
* ``registered_name``: absent, the class name, or ``Custom>`` + a built-in optimizer.
* function-valued strings and ``function`` objects: built-in activation, loss, metric,
  initializer, regularizer, constraint and optimizer names only.
* ``TFOpLambda``/``SlicingOpLambda`` (tf_keras records plain TensorFlow calls in a
  functional model as these): only functions of the pure math/array namespaces
  (``math``, ``nn``, ``linalg``, ``signal``, ``bitwise``, ``random``, ``image``,
  ``sparse``, ``ragged``, ``__operators__``) and the array functions of
  :data:`TF_ARRAY_FUNCTIONS`; anything touching files, Python callbacks or output
  (``io.*``, ``py_function``, ``numpy_function``, ``print``, ``data``, ``summary``,
  ``compat.v1``, ``load_op_library``, ...) is refused.
* SavedModel: no op of :data:`REFUSED_OPS` (nor a name containing one of
  :data:`REFUSED_OP_PARTS`) in any function that a signature, the init op or a restored
  object can reach (not the saver's own save/restore functions: TensorFlow 2's loader
  restores variables with ops of its own); its ``keras_metadata.pb`` layer configs
  follow the config rules above.
* frozen graphs (``.pb`` GraphDef): every op of the graph and its function library
  passes the SavedModel op rules above, is built into TensorFlow (no custom op
  libraries) and is stateless (constants only: no variables, random state, queues, I/O
  or Python calls).
* ONNX: operator sets and nodes (subgraphs too) of the standard domains
  :data:`ONNX_DOMAINS` only, no model-local functions, no tensor in an external data file.
* ``.keras`` must be a zip archive, ``.h5``/``.hdf5`` an HDF5 file, ``.pb`` a GraphDef,
  ``.onnx`` an ONNX model, a folder a SavedModel, and params.json's ``format`` (if given)
  must agree (:func:`model_format`): the loader a name picks reads only the format that
  was checked. A Keras 3 archive (``metadata.json`` ``keras_version`` 3.x) is loaded with
  Keras 3 (:func:`load_keras3_model`), a tf_keras one with tf_keras.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

#: Largest config document read from a model file (bytes).
MAX_CONFIG_BYTES = 64 * 1024**2

KERAS_MODULE = re.compile(r"^(tf_)?keras(\.[A-Za-z0-9_.]+)?$")
TF_MODULE = re.compile(r"^tensorflow(\.[A-Za-z0-9_.]+)?$")


def _words(text: str) -> frozenset[str]:
    """The whitespace-separated names of ``text``."""
    return frozenset(text.split())


MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})
LAYER_CLASSES = _words(
    """
    Activation ActivityRegularization Add AdditiveAttention AlphaDropout Attention Average
    AveragePooling1D AveragePooling2D AveragePooling3D AvgPool1D AvgPool2D AvgPool3D
    BatchNormalization Bidirectional CategoryEncoding CenterCrop Concatenate Conv1D
    Conv1DTranspose Conv2D Conv2DTranspose Conv3D Conv3DTranspose ConvLSTM1D ConvLSTM2D
    ConvLSTM3D Convolution1D Convolution1DTranspose Convolution2D Convolution2DTranspose
    Convolution3D Convolution3DTranspose Cropping1D Cropping2D Cropping3D Dense
    DepthwiseConv1D DepthwiseConv2D Discretization Dot Dropout ELU EinsumDense Embedding
    Flatten GRU GRUCell GaussianDropout GaussianNoise GlobalAveragePooling1D
    GlobalAveragePooling2D GlobalAveragePooling3D GlobalAvgPool1D GlobalAvgPool2D
    GlobalAvgPool3D GlobalMaxPool1D GlobalMaxPool2D GlobalMaxPool3D GlobalMaxPooling1D
    GlobalMaxPooling2D GlobalMaxPooling3D GroupNormalization Identity InputLayer LSTM
    LSTMCell LayerNormalization LeakyReLU LocallyConnected1D LocallyConnected2D Masking
    MaxPool1D MaxPool2D MaxPool3D MaxPooling1D MaxPooling2D MaxPooling3D Maximum Minimum
    MultiHeadAttention Multiply Normalization PReLU Permute RNN RandomBrightness
    RandomContrast RandomCrop RandomFlip RandomHeight RandomRotation RandomTranslation
    RandomWidth RandomZoom ReLU RepeatVector Rescaling Reshape Resizing SeparableConv1D
    SeparableConv2D SeparableConvolution1D SeparableConvolution2D SimpleRNN SimpleRNNCell
    Softmax SpatialDropout1D SpatialDropout2D SpatialDropout3D SpectralNormalization
    StackedRNNCells Subtract ThresholdedReLU TimeDistributed UnitNormalization UpSampling1D
    UpSampling2D UpSampling3D ZeroPadding1D ZeroPadding2D ZeroPadding3D
    RandomFourierFeatures SyncBatchNormalization TFOpLambda SlicingOpLambda
    """
)
OPTIMIZER_CLASSES = _words(
    """
    Adadelta Adafactor Adagrad Adam AdamW Adamax Ftrl Lion Nadam RMSprop SGD
    LossScaleOptimizer CosineDecay CosineDecayRestarts ExponentialDecay InverseTimeDecay
    PiecewiseConstantDecay PolynomialDecay
    """
)
OBJECT_CLASSES = _words(
    """
    Constant GlorotNormal GlorotUniform HeNormal HeUniform LecunNormal LecunUniform Ones
    Orthogonal RandomNormal RandomUniform TruncatedNormal VarianceScaling Zeros
    L1 L1L2 L2 OrthogonalRegularizer MaxNorm MinMaxNorm NonNeg RadialConstraint UnitNorm
    BinaryCrossentropy BinaryFocalCrossentropy CategoricalCrossentropy
    CategoricalFocalCrossentropy CategoricalHinge CosineSimilarity Hinge Huber KLDivergence
    LogCosh MeanAbsoluteError MeanAbsolutePercentageError MeanSquaredError
    MeanSquaredLogarithmicError Poisson SparseCategoricalCrossentropy SquaredHinge
    AUC Accuracy BinaryAccuracy BinaryIoU CategoricalAccuracy F1Score FBetaScore
    FalseNegatives FalsePositives IoU LogCoshError Mean MeanIoU MeanMetricWrapper
    MeanRelativeError MeanTensor OneHotIoU OneHotMeanIoU Precision PrecisionAtRecall R2Score
    Recall RecallAtPrecision RootMeanSquaredError SensitivityAtSpecificity
    SparseCategoricalAccuracy SparseTopKCategoricalAccuracy SpecificityAtSensitivity Sum
    TopKCategoricalAccuracy TrueNegatives TruePositives
    Policy DTypePolicy FloatDTypePolicy
    """
)
BUILTIN_CLASSES = MODEL_CLASSES | LAYER_CLASSES | OPTIMIZER_CLASSES | OBJECT_CLASSES

#: Built-in layers refused anyway, with the reason.
REFUSED_LAYERS = {
    "Lambda": "a Lambda layer runs Python code stored in the file",
    "TFSMLayer": "it loads another SavedModel from a path",
    "DenseFeatures": "feature columns can read vocabulary files",
    "StringLookup": "lookup layers can read vocabulary files",
    "IntegerLookup": "lookup layers can read vocabulary files",
    "TextVectorization": "text layers can read vocabulary files",
    "Hashing": "not needed for numeric models",
    "HashedCrossing": "not needed for numeric models",
}

#: Names a function-valued field (``activation``, ``loss``, ``metrics``, ...) may give.
BUILTIN_FUNCTIONS = _words(
    """
    elu exponential gelu hard_sigmoid linear mish relu selu sigmoid softmax softplus
    softsign swish tanh leaky_relu relu6 silu hard_silu hard_swish log_softmax log_sigmoid
    celu glu hard_tanh sparse_plus squareplus soft_shrink tanh_shrink sparsemax
    binary_crossentropy binary_focal_crossentropy categorical_crossentropy
    categorical_focal_crossentropy categorical_hinge cosine_similarity hinge huber
    kl_divergence kld kullback_leibler_divergence log_cosh logcosh mae mape
    mean_absolute_error mean_absolute_percentage_error mean_squared_error
    mean_squared_logarithmic_error mse msle poisson sparse_categorical_crossentropy
    squared_hinge binary_accuracy categorical_accuracy sparse_categorical_accuracy
    sparse_top_k_categorical_accuracy top_k_categorical_accuracy accuracy acc
    crossentropy ce auc precision recall
    constant glorot_normal glorot_uniform he_normal he_uniform identity lecun_normal
    lecun_uniform ones orthogonal random_normal random_uniform truncated_normal
    variance_scaling zeros l1 l1_l2 l2 orthogonal_regularizer max_norm min_max_norm
    non_neg radial_constraint unit_norm
    adadelta adafactor adagrad adam adamw adamax ftrl lion nadam rmsprop sgd
    """
)

#: Keys whose string values Keras resolves to functions or objects by name.
FUNCTION_KEYS = frozenset(
    {"activation", "recurrent_activation", "loss", "losses", "metrics", "weighted_metrics"}
    | {"fn", "optimizer", "reduction_fn"}
)
FUNCTION_SUFFIXES = ("_initializer", "_regularizer", "_constraint")

#: TensorFlow namespaces whose functions a ``TFOpLambda`` may call (pure math/arrays).
TF_PURE_NAMESPACES = frozenset(
    {"math", "nn", "linalg", "signal", "bitwise", "random", "image", "sparse", "ragged"}
    | {"__operators__"}
)
#: Top-level TensorFlow array functions a ``TFOpLambda`` may call.
TF_ARRAY_FUNCTIONS = _words(
    """
    abs add add_n argmax argmin argsort boolean_mask broadcast_to cast clip_by_norm
    clip_by_value concat cos cumsum divide einsum equal exp expand_dims eye fill floor
    gather gather_nd greater greater_equal identity less less_equal linspace log
    logical_and logical_not logical_or matmul maximum meshgrid minimum multiply
    negative norm not_equal one_hot ones ones_like pad pow range rank reduce_all
    reduce_any reduce_logsumexp reduce_max reduce_mean reduce_min reduce_prod reduce_sum
    repeat reshape reverse roll round scatter_nd searchsorted shape sigmoid sign sin size
    slice sort split sqrt square squeeze stack stop_gradient strided_slice subtract tan
    tanh tensordot tile transpose truediv unique unstack where zeros zeros_like
    """
)

#: SavedModel graph ops refused in any reachable function (files, Python, output, I/O).
REFUSED_OPS = _words(
    """
    ReadFile WriteFile MatchingFiles MatchingFilesDataset ImmutableConst PyFunc
    PyFuncStateless EagerPyFunc PrintV2 Print Save SaveV2 SaveSlices Restore RestoreV2
    RestoreSlice MergeV2Checkpoints ShardedFilename ShardedFilespec LoadAndRemapMatrix
    WholeFileReader WholeFileReaderV2 TextLineReader TextLineReaderV2 TFRecordReader
    TFRecordReaderV2 FixedLengthRecordReader FixedLengthRecordReaderV2 IdentityReader
    IdentityReaderV2 LMDBReader DecodeProtoV2 EncodeProto InitializeTableFromTextFile
    InitializeTableFromTextFileV2 DebugIdentity DebugIdentityV2 DebugIdentityV3
    DebugNanCount DebugNumericSummary DebugNumericSummaryV2 RpcCall RpcClient RpcServer
    RpcServerStart RpcServerRegister Rpc TryRpc Send Recv _Send _Recv _HostSend _HostRecv
    """
)
#: Op-name parts refused wherever they appear (readers, datasets, summaries, ...).
REFUSED_OP_PARTS = (
    "File",
    "Reader",
    "Dataset",
    "Iterator",
    "Summary",
    "Checkpoint",
    "Collective",
    "PyFunc",
    "Rpc",
    "Tpu",
    "TPU",
)
#: Tensor specs a ``__typespec__`` object may name.
SPEC_NAMES = frozenset({"TensorSpec", "RaggedTensorSpec", "SparseTensorSpec"})


class UnsafeModelError(ValueError):
    """A model file that would run code on load; the message names the file and the
    layer/op and the rule."""


# --------------------------------------------------------------------------- configs


def check_keras_config(config: dict, source: str, allowed: Collection[str] = ()) -> None:
    """Walk a Keras (tf_keras or Keras 3) model config from ``source`` (a file name for
    messages); raise :class:`UnsafeModelError` for a ``Lambda`` layer, a class that is not
    a built-in Keras layer/initializer/regularizer/constraint/activation/optimizer/loss/
    metric, a ``module`` outside keras/tf_keras, a function-valued field that is not a
    built-in name or a ``TFOpLambda`` calling more than pure math. ``allowed`` are layer
    class names an operator allow-lists (setting ``allowed_model_layers``)."""
    if not isinstance(config, dict):
        raise UnsafeModelError(f"{source}: the model config is not a JSON object")
    try:
        _ConfigWalk(source, frozenset(allowed)).walk(config, "the model")
    except RecursionError:
        raise UnsafeModelError(f"{source}: the model config is nested too deeply") from None


class _ConfigWalk:
    """One walk over a config; ``owner`` names the object a value sits in (for messages)."""

    def __init__(self, source: str, allowed: frozenset[str]) -> None:
        self.source = source
        self.allowed = allowed

    def refuse(self, what: str, owner: str, rule: str) -> UnsafeModelError:
        """The error for ``what`` found in ``owner``, refused by ``rule``."""
        return UnsafeModelError(f"{self.source}: {what} in {owner} is refused: {rule}")

    def walk(self, node: Any, owner: str) -> None:
        """Check every object and function-valued field below ``node``."""
        if isinstance(node, list):
            for item in node:
                self.walk(item, owner)
        elif isinstance(node, dict):
            if "class_name" in node:
                if not self.check_object(node, owner):
                    return
                owner = _label(node)
            for key, value in node.items():
                if not isinstance(key, str):
                    raise self.refuse(f"key {key!r}", owner, "config keys must be strings")
                if _is_function_key(key):
                    self.check_function_names(value, key, owner)
                self.walk(value, owner)

    def check_function_names(self, value: Any, key: str, owner: str) -> None:
        """Strings anywhere in a function-valued field (not inside objects) are names."""
        if isinstance(value, str):
            if value not in BUILTIN_FUNCTIONS and value not in BUILTIN_CLASSES:
                raise self.refuse(
                    f"{key} {value!r}",
                    owner,
                    "only built-in Keras activation/loss/metric/initializer/optimizer names",
                )
        elif isinstance(value, list):
            for item in value:
                self.check_function_names(item, key, owner)
        elif isinstance(value, dict) and "class_name" not in value:
            for item in value.values():
                self.check_function_names(item, key, owner)

    def check_object(self, node: dict, owner: str) -> bool:
        """Check one serialized object in ``owner``; return whether to walk its children."""
        cls = node["class_name"]
        if not isinstance(cls, str):
            raise self.refuse(f"class_name {cls!r}", owner, "class names are strings")
        inner = node.get("config")
        label = _label(node)
        module, registered = node.get("module"), node.get("registered_name")
        if cls == "__lambda__" and "Lambda" not in self.allowed:
            raise self.refuse("a Python lambda", owner, REFUSED_LAYERS["Lambda"])
        if cls in ("__lambda__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__"):
            return False
        if cls in ("__tuple__", "__keras_tensor__", "TensorShape", "InputSpec"):
            return True
        if cls == "TypeSpec":  # SavedModel metadata: a registered TensorFlow type spec
            spec = node.get("type_spec")
            if not isinstance(spec, str) or spec.removeprefix("tf.") not in SPEC_NAMES:
                raise self.refuse(f"type spec {spec!r}", owner, "not a tensor spec")
            return True
        if cls == "__typespec__":
            spec = node.get("spec_name")
            if (
                not isinstance(spec, str)
                or spec not in SPEC_NAMES
                or not (module is None or TF_MODULE.match(str(module)))
            ):
                raise self.refuse(f"type spec {spec!r} of {module!r}", owner, "not a tensor spec")
            return False
        if cls == "function":
            if module not in (None, "builtins") and not KERAS_MODULE.match(str(module)):
                raise self.refuse(f"function module {module!r}", owner, "not a Keras module")
            if not isinstance(inner, str) or inner not in BUILTIN_FUNCTIONS:
                raise self.refuse(f"function {inner!r}", owner, "not a built-in Keras function")
            return False
        if cls in self.allowed:
            return True
        if cls in REFUSED_LAYERS:
            raise self.refuse(f"layer {label}", owner, REFUSED_LAYERS[cls])
        base = cls.removeprefix("Custom>")
        if base != cls and base not in OPTIMIZER_CLASSES:
            raise self.refuse(f"class {cls!r}", owner, "only built-in optimizers take 'Custom>'")
        if base not in BUILTIN_CLASSES:
            alias = f" registered as {registered!r}" if registered not in (None, cls) else ""
            raise self.refuse(
                f"layer/object {label}{alias}",
                owner,
                "not a built-in Keras class (an operator may allow-list layer classes "
                "with MLAAS4HEP_ALLOWED_MODEL_LAYERS)",
            )
        if module is not None and not KERAS_MODULE.match(str(module)):
            raise self.refuse(
                f"module {module!r} of {label}", owner, "only keras/tf_keras modules are imported"
            )
        if registered not in (None, cls, base):
            raise self.refuse(
                f"registered_name {registered!r} of {label}", owner, "must be the class name"
            )
        if cls in ("TFOpLambda", "SlicingOpLambda"):
            self.check_tf_function(inner, label, owner)
        return True

    def check_tf_function(self, inner: Any, label: str, owner: str) -> None:
        """Refuse a TFOpLambda whose TensorFlow function is not pure math/arrays."""
        path = inner.get("function") if isinstance(inner, dict) else None
        if not isinstance(path, str) or not _pure_tf_function(path):
            raise self.refuse(
                f"layer {label} calling tf.{path}",
                owner,
                "TFOpLambda layers may call only pure math/array functions "
                "(no io, py_function, numpy_function, print, data, summary, compat)",
            )


def _is_function_key(key: str) -> bool:
    """Whether Keras resolves string values of ``key`` to functions or objects by name."""
    return key in FUNCTION_KEYS or key.endswith(FUNCTION_SUFFIXES)


def _label(node: dict) -> str:
    """``'name' (Class)`` of a serialized object, or ``Class`` when it has no name."""
    cls = node.get("class_name")
    inner = node.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    name = name if isinstance(name, str) else node.get("name")
    return f"{name!r} ({cls})" if isinstance(name, str) else repr(cls)


def _pure_tf_function(path: str) -> bool:
    """True when ``tf.<path>`` is a function of :data:`TF_PURE_NAMESPACES` or
    :data:`TF_ARRAY_FUNCTIONS`."""
    parts = path.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    if len(parts) == 1:
        return parts[0] in TF_ARRAY_FUNCTIONS
    return len(parts) == 2 and parts[0] in TF_PURE_NAMESPACES


# --------------------------------------------------------------------------- files

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

#: Model formats by the name params.json's ``format`` and ``/models`` give them.
MODEL_FORMATS = {
    "tf_keras": "a tf_keras (Keras 2) .keras archive or .h5/.hdf5 file",
    "keras": "a Keras 3 .keras archive",
    "savedmodel": "a TensorFlow SavedModel folder (saved_model.pb)",
    "graphdef": "a frozen TensorFlow graph .pb file (GraphDef)",
    "onnx": "an ONNX .onnx file",
}
#: Formats a model file's name allows, by suffix (a folder is a SavedModel).
SUFFIX_FORMATS = {
    ".keras": ("tf_keras", "keras"),
    ".h5": ("tf_keras", "keras"),
    ".hdf5": ("tf_keras", "keras"),
    ".pb": ("graphdef",),
    ".onnx": ("onnx",),
}
#: What a file's content is when it is no model format at all (for messages).
_CONTENT_NAMES = {
    "zip": "a zip archive (a .keras model?)",
    "hdf5": "an HDF5 file (a .h5 model?)",
    "graphdef": "a TensorFlow GraphDef (a .pb model?)",
    "onnx": "an ONNX model (a .onnx model?)",
    "unknown": "no model format (not a zip archive, HDF5 file or protobuf model)",
}


def model_format(path: Path, declared: str | None = None) -> str:
    """The format of the model at ``path`` (a key of :data:`MODEL_FORMATS`), judged by
    its content and required to agree with its name and with ``declared`` (params.json's
    ``format``, if any); :class:`UnsafeModelError` naming the file and what was expected."""
    name = path.name
    if declared is not None and (not isinstance(declared, str) or declared not in MODEL_FORMATS):
        raise UnsafeModelError(
            f"params.json 'format' {declared!r} is not one of {', '.join(MODEL_FORMATS)}"
        )
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UnsafeModelError(
                f"model folder {name!r} cannot be loaded: not a SavedModel (no saved_model.pb)"
            )
        found = "savedmodel"
    elif not path.is_file():
        raise UnsafeModelError(f"{name}: not a model file")
    elif name == "saved_model.pb":
        raise UnsafeModelError(
            f"model file {name!r} is the graph of a SavedModel: params.json 'model' must "
            f"name the SavedModel folder ({path.parent.name!r})"
        )
    else:
        allowed = SUFFIX_FORMATS.get(path.suffix.lower())
        if allowed is None:
            raise UnsafeModelError(
                f"model file {name!r} cannot be loaded: expected a .keras, .h5, .pb or .onnx "
                "file or a SavedModel folder"
            )
        content = _file_content(path)
        found = _keras_flavour(path, content) if content in ("zip", "hdf5") else content
        if found not in allowed:
            expected = " or ".join(MODEL_FORMATS[f] for f in allowed)
            what = _CONTENT_NAMES.get(content, MODEL_FORMATS.get(found, content))
            raise UnsafeModelError(
                f"model file {name!r} cannot be loaded: by name and content it must be "
                f"{expected}, but it is {what}"
            )
    if declared is not None and declared != found:
        raise UnsafeModelError(
            f"params.json 'format' declares {declared!r} ({MODEL_FORMATS[declared]}) but "
            f"model {name!r} is {found!r} ({MODEL_FORMATS[found]})"
        )
    return found


def _file_content(path: Path) -> str:
    """What the first bytes of ``path`` say: ``zip``, ``hdf5``, ``onnx`` (a protobuf whose
    first field is ONNX's ``ir_version``), ``graphdef`` (one starting with a node or the
    library) or ``unknown``."""
    with path.open("rb") as stream:
        head = stream.read(8)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head == HDF5_MAGIC:
        return "hdf5"
    if head[:1] == b"\x08":
        return "onnx"
    if head[:1] in (b"\x0a", b"\x12", b"\x22"):
        return "graphdef"
    return "unknown"


def _keras_flavour(path: Path, content: str) -> str:
    """``keras`` (Keras 3) or ``tf_keras`` for a .keras zip archive or a .h5 HDF5 file, by
    the Keras version its metadata names (``metadata.json``, the HDF5 ``keras_version``);
    ``unknown`` when the content does not fit the name."""
    archive_name = path.suffix.lower() == ".keras"
    if archive_name != (content == "zip"):
        return "unknown"
    version: Any = None
    try:
        if archive_name:
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("metadata.json")
                if info.file_size <= MAX_CONFIG_BYTES:
                    version = json.loads(archive.read(info)).get("keras_version")
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                version = handle.attrs.get("keras_version")
    except (KeyError, zipfile.BadZipFile, OSError, ValueError, AttributeError):
        return "tf_keras"  # no readable metadata: the tf_keras checks say what is wrong
    if isinstance(version, bytes):
        version = version.decode("utf-8", errors="replace")
    return "keras" if isinstance(version, str) and version.startswith("3.") else "tf_keras"


def check_model_file(
    path: Path,
    allowed: Collection[str] | None = None,
    *,
    compile: bool = True,
    declared: str | None = None,
) -> str:
    """Check the model at ``path`` before any loader sees it: a ``.keras`` archive (its
    config.json, nothing unpacked), a ``.h5`` (its ``model_config`` and
    ``training_config`` attributes, read with h5py), a SavedModel folder (its
    ``keras_metadata.pb`` configs and the ops of every function its signatures and
    objects reach), a frozen graph ``.pb`` (:func:`check_graphdef`) or an ONNX file
    (:func:`check_onnx`). ``allowed``: layer classes let through (None: the operator's
    setting ``allowed_model_layers``); without ``compile`` the training config (optimizer,
    loss, metrics), which a loader then ignores, is not checked; ``declared``: the format
    params.json names. Returns the format (:func:`model_format`); raises
    :class:`UnsafeModelError` naming the file, layer/op and rule."""
    path = Path(path)
    allowed = operator_allowed_layers() if allowed is None else allowed
    kind = model_format(path, declared)
    if kind == "savedmodel":
        check_saved_model(path, allowed)
    elif kind == "graphdef":
        check_graphdef(path)
    elif kind == "onnx":
        check_onnx(path)
    elif path.suffix.lower() == ".keras":
        config = _archive_config(path)
        if not compile:
            config.pop("compile_config", None)  # as the loaders drop it
        check_keras_config(config, f"{path.name} (config.json)", allowed)
    else:
        model_config, training_config = _h5_configs(path)
        check_keras_config(model_config, f"{path.name} (model_config)", allowed)
        if training_config is not None and compile:
            check_keras_config(training_config, f"{path.name} (training_config)", allowed)
    return kind


def _archive_config(path: Path) -> dict:
    """The config.json of the .keras archive ``path``, read without unpacking anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise UnsafeModelError(f"{path.name}: config.json is over {MAX_CONFIG_BYTES} bytes")
            raw = archive.read(info)
    except KeyError:
        raise UnsafeModelError(f"{path.name}: the .keras archive has no config.json") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsafeModelError(f"{path.name}: not a valid .keras archive: {error}") from None
    return _json(raw, f"{path.name} (config.json)")


def _h5_configs(path: Path) -> tuple[dict, dict | None]:
    """The ``model_config`` and ``training_config`` (or None) attributes of a .h5 file."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attrs = {key: handle.attrs.get(key) for key in ("model_config", "training_config")}
    except OSError as error:
        raise UnsafeModelError(f"{path.name}: not a readable HDF5 file: {error}") from None
    if attrs["model_config"] is None:
        raise UnsafeModelError(f"{path.name}: no model_config attribute (a weights-only file?)")
    training = attrs["training_config"]
    return (
        _json(attrs["model_config"], f"{path.name} (model_config)"),
        None if training is None else _json(training, f"{path.name} (training_config)"),
    )


def _json(raw: Any, source: str) -> dict:
    """The JSON object of ``raw`` (text or bytes) from ``source``; :class:`UnsafeModelError`
    when it is too large, not JSON or not an object."""
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw).decode("utf-8", errors="strict")
    if not isinstance(raw, str) or len(raw) > MAX_CONFIG_BYTES:
        raise UnsafeModelError(f"{source}: not a JSON text of at most {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise UnsafeModelError(f"{source}: the JSON is nested too deeply") from None
    except ValueError as error:
        raise UnsafeModelError(f"{source}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UnsafeModelError(f"{source}: the model config is not a JSON object")
    return data


# --------------------------------------------------------------------------- SavedModel


def check_saved_model(path: Path, allowed: Collection[str] = ()) -> None:
    """Check a SavedModel folder: every op reachable from its signatures, init op and
    restored objects (:data:`REFUSED_OPS`, :data:`REFUSED_OP_PARTS`), and the layer
    configs of its ``keras_metadata.pb``."""
    from tensorflow.core.protobuf import saved_model_pb2

    source = f"{path.name} (saved_model.pb)"
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as error:  # protobuf raises DecodeError and others
        raise UnsafeModelError(f"{source}: not a valid SavedModel: {error}") from None
    for meta_graph in saved.meta_graphs:
        _check_graph(meta_graph, source)
    metadata = path / "keras_metadata.pb"
    if metadata.is_file():
        _check_keras_metadata(metadata, f"{path.name} (keras_metadata.pb)", allowed)


def _check_graph(meta_graph: Any, source: str) -> None:
    """Refuse an op of :data:`REFUSED_OPS` reachable in one MetaGraphDef: graph nodes back
    from the signatures' outputs, then every function they or the object graph call."""
    graph = meta_graph.graph_def
    nodes = {node.name: node for node in graph.node}
    functions = {fn.signature.name: fn for fn in graph.library.function}
    roots = [
        tensor.name for sig in meta_graph.signature_def.values() for tensor in sig.outputs.values()
    ]
    reached_fns: set[str] = set(meta_graph.object_graph_def.concrete_functions)
    seen: set[str] = set()
    pending = [_node_name(name) for name in roots]
    while pending:
        name = pending.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        node = nodes[name]
        _check_op(node.op, f"graph node {name!r}", source)
        reached_fns.update(_called_functions(node))
        pending += [_node_name(i) for i in node.input]
    done: set[str] = set()
    todo = list(reached_fns)
    while todo:
        fn_name = todo.pop()
        if fn_name in done:
            continue
        done.add(fn_name)
        fn = functions.get(fn_name)
        if fn is None:
            continue
        for node in fn.node_def:
            _check_op(node.op, f"node {node.name!r} of function {fn_name!r}", source)
            todo += _called_functions(node)
            if node.op in functions:  # a library function called as an op
                todo.append(node.op)


def _node_name(tensor: str) -> str:
    """The node of a tensor or control input name (``^name``, ``name:0``)."""
    return tensor.lstrip("^").split(":")[0]


def _called_functions(node: Any) -> list[str]:
    """Names of the functions a NodeDef's attributes call (``f``, branches, bodies)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        if value.HasField("list"):
            names += [fn.name for fn in value.list.func]
    return names


def _check_op(op: str, where: str, source: str) -> None:
    """Refuse ``op`` (found at ``where`` in ``source``) when it is or contains a refused op."""
    if op in REFUSED_OPS or any(part in op for part in REFUSED_OP_PARTS):
        raise UnsafeModelError(
            f"{source}: op {op!r} ({where}) is refused: model graphs may not read or "
            "write files, call Python, print, or talk to other processes"
        )


def _check_keras_metadata(path: Path, source: str, allowed: Collection[str]) -> None:
    """Check every layer config of a SavedModel's ``keras_metadata.pb``."""
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError and others
        raise UnsafeModelError(f"{source}: not valid Keras metadata: {error}") from None
    for node in metadata.nodes:
        data = _json(node.metadata, f"{source} node {node.node_path!r}")
        check_keras_config(data, f"{source} node {node.node_path!r}", allowed)


# --------------------------------------------------------------------------- frozen graphs


def read_graphdef(path: Path) -> Any:
    """The ``GraphDef`` of the frozen graph file ``path``; :class:`UnsafeModelError` when
    it does not parse or holds no node."""
    import tensorflow as tf  # registers the ops that check_graphdef looks up

    graph = tf.compat.v1.GraphDef()
    try:
        graph.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError and others
        raise UnsafeModelError(
            f"{path.name}: not a valid frozen TensorFlow graph (GraphDef): {error}"
        ) from None
    if not graph.node:
        raise UnsafeModelError(f"{path.name}: the frozen TensorFlow graph (GraphDef) has no node")
    return graph


def check_graphdef(path: Path) -> None:
    """Check every op of a frozen graph ``.pb`` (its nodes and its library's functions):
    none of :data:`REFUSED_OPS` / :data:`REFUSED_OP_PARTS`, only ops built into
    TensorFlow (no custom op libraries), and only stateless ones (a frozen graph holds
    constants, not variables, random state, queues, I/O or Python calls)."""
    from tensorflow.python.framework import op_def_registry

    graph = read_graphdef(path)
    source = f"{path.name} (GraphDef)"
    functions = {fn.signature.name for fn in graph.library.function}
    nodes = [(node, f"graph node {node.name!r}") for node in graph.node] + [
        (node, f"node {node.name!r} of function {fn.signature.name!r}")
        for fn in graph.library.function
        for node in fn.node_def
    ]
    for node, where in nodes:
        _check_op(node.op, where, source)
        if node.op in functions:
            continue
        op_def = op_def_registry.get(node.op)
        if op_def is None:
            raise UnsafeModelError(
                f"{source}: op {node.op!r} ({where}) is refused: not an op built into "
                "TensorFlow (custom op libraries are not loaded)"
            )
        if op_def.is_stateful:
            raise UnsafeModelError(
                f"{source}: op {node.op!r} ({where}) is refused: a frozen graph may hold "
                "only stateless ops (no variables, random state, I/O or Python calls)"
            )


# --------------------------------------------------------------------------- ONNX

#: ONNX operator domains a model may use: the standard ones, no custom op libraries.
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def read_onnx(path: Path) -> Any:
    """The ``onnx.ModelProto`` of ``path``, parsed from its bytes (no external data file is
    read); :class:`UnsafeModelError` when it does not parse or has no graph node."""
    import onnx

    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError and others
        raise UnsafeModelError(f"{path.name}: not a valid ONNX model: {error}") from None
    if model.ir_version <= 0 or not model.graph.node:
        raise UnsafeModelError(f"{path.name}: not a valid ONNX model (no ir_version or no node)")
    return model


def check_onnx(path: Path) -> None:
    """Check an ONNX model: operator sets and every node (subgraphs included) of the
    standard domains :data:`ONNX_DOMAINS` only, no model-local functions, and no tensor
    stored in an external data file (which the runtime would read from a path)."""
    model = read_onnx(path)
    source = f"{path.name} (ONNX)"
    for opset in model.opset_import:
        if opset.domain not in ONNX_DOMAINS:
            raise UnsafeModelError(
                f"{source}: operator set domain {opset.domain!r} is refused: only the "
                "standard ONNX domains ('', 'ai.onnx', 'ai.onnx.ml'), no custom ops"
            )
    if model.functions:
        raise UnsafeModelError(
            f"{source}: model-local function {model.functions[0].name!r} is refused: "
            "only standard ONNX operators"
        )
    _check_onnx_graph(model.graph, source)


def _sparse_parts(sparse: Any) -> list[Any]:
    """The values and indices tensors of ONNX sparse tensors."""
    return [t for s in sparse for t in (s.values, s.indices)]


def _check_onnx_graph(graph: Any, source: str) -> None:
    """Refuse custom-domain nodes and external tensors in ``graph`` and its subgraphs."""
    tensors = [*graph.initializer, *_sparse_parts(graph.sparse_initializer)]
    for node in graph.node:
        if node.domain not in ONNX_DOMAINS:
            raise UnsafeModelError(
                f"{source}: node {node.name!r} ({node.domain}.{node.op_type}) is refused: "
                "only standard ONNX operators, no custom op domains"
            )
        for attr in node.attribute:
            tensors += [attr.t, *attr.tensors]
            tensors += _sparse_parts([attr.sparse_tensor, *attr.sparse_tensors])
            for sub in (attr.g, *attr.graphs):
                _check_onnx_graph(sub, source)
    for tensor in tensors:
        if tensor.external_data or tensor.data_location == 1:  # TensorProto.EXTERNAL
            raise UnsafeModelError(
                f"{source}: tensor {tensor.name!r} is refused: its data is in an external "
                "file (bundle one self-contained .onnx file)"
            )


# --------------------------------------------------------------------------- loading


def import_tf_keras() -> Any:
    """The legacy Keras module (``tf_keras``), importing TensorFlow on first use."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras

    return tf_keras


def operator_allowed_layers() -> list[str]:
    """Layer classes the operator allow-lists for users' model files: the setting
    ``allowed_model_layers`` of this process's environment or config file."""
    from mlaas4hep.settings import load_settings

    return load_settings().allowed_model_layers


def load_keras_model(
    path: Path, *, compile: bool = False, allowed: Collection[str] | None = None
) -> Any:
    """:func:`check_model_file`, then :func:`load_checked_tf_keras`; with ``compile`` the
    optimizer, loss and metrics come back; ``allowed`` as for :func:`check_model_file`.
    Returns the Keras model.

    Raises :class:`UnsafeModelError` for an unsafe file; loader errors pass through.
    """
    path = Path(path)
    allowed = operator_allowed_layers() if allowed is None else allowed
    kind = check_model_file(path, allowed, compile=compile)
    return load_checked_tf_keras(path, kind, compile=compile, allowed=allowed)


def load_checked_tf_keras(path: Path, kind: str, *, compile: bool, allowed: Collection[str]) -> Any:
    """Load ``path``, which :func:`check_model_file` just passed as format ``kind``, with
    tf_keras in safe mode (a ``SafeModeScope`` around every format, ``safe_mode=True`` for
    ``.keras``). :class:`UnsafeModelError` unless ``kind`` is a tf_keras format."""
    if kind not in ("tf_keras", "savedmodel"):
        raise UnsafeModelError(f"{path.name}: {MODEL_FORMATS[kind]}, not a tf_keras model")
    tf_keras = import_tf_keras()
    from tf_keras.src.saving.serialization_lib import SafeModeScope

    safe = "Lambda" not in allowed
    with SafeModeScope(safe):
        if path.suffix == ".keras":
            return tf_keras.models.load_model(str(path), compile=compile, safe_mode=safe)
        return tf_keras.models.load_model(str(path), compile=compile)


def load_keras3_model(path: Path, *, allowed: Collection[str] | None = None) -> Any:
    """:func:`check_model_file`, then :func:`load_checked_keras3`; ``allowed`` as for
    :func:`check_model_file`. Returns the Keras 3 model.

    Raises :class:`UnsafeModelError` for an unsafe file or one that is not a Keras 3
    model; loader errors pass through.
    """
    path = Path(path)
    allowed = operator_allowed_layers() if allowed is None else allowed
    return load_checked_keras3(path, check_model_file(path, allowed, compile=False), allowed)


def load_checked_keras3(path: Path, kind: str, allowed: Collection[str]) -> Any:
    """Load the Keras 3 archive ``path``, which :func:`check_model_file` just passed as
    format ``kind``, with Keras 3 (``keras.saving.load_model``, safe mode, not compiled).
    :class:`UnsafeModelError` unless ``kind`` is ``"keras"``. ``import keras`` is Keras 3
    even where ``TF_USE_LEGACY_KERAS`` is set (that variable only switches ``tf.keras``).
    """
    if kind != "keras":
        raise UnsafeModelError(f"{path.name}: {MODEL_FORMATS[kind]}, not a Keras 3 model")
    import keras

    return keras.saving.load_model(str(path), compile=False, safe_mode="Lambda" not in allowed)
