"""Model bundles, the one on-disk format of a model: written, validated, unpacked, loaded.

A bundle is a folder (``models/<name>/<version>/`` in the registry)::

    params.json     TFaaS params: name, model, labels, inputNode/input_node, ...
    model.keras     the model: the file/folder that ``params["model"]`` names, in one of
                    the formats of :mod:`mlaas4hep.modelfiles.formats` (tf_keras or
                    Keras 3 ``.keras``/``.h5``, a SavedModel, a frozen graph ``.pb``
                    with ``inputNode``/``outputNode``, ``.onnx``; ``format`` may say which)
    labels.txt      one class label a line (optional)
    specs.json      MLaaS4HEP specs: jdim, minv, maxv, fkeys, jkeys, nans, events (optional)
    metadata.json   owner, run id, spec_sha256, metrics, feature_names, ... (optional)
    saved_model/    a trained model also as a TensorFlow SavedModel (``serving_default``)
    model.onnx      optional: a trained model in ONNX (Triton/SONIC), input ``features``

:func:`write_bundle` writes the bundle of a trained model; uploads are checked
(:func:`check_bundle_dir`) and unpacked (:func:`unpack_tarball`) without TensorFlow, so
the HTTP ingress can check them without importing it; :func:`load_bundle` loads one for
inference. Model files are user data: every load (an upload's check in the model
replica, a registry bundle, batch predictions) first checks the file with
:mod:`mlaas4hep.modelfiles.safety` and then loads it in safe mode, so ``Lambda`` and
unknown layers, foreign modules and file ops are refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mlaas4hep.modelfiles.formats import ModelFileError, Predictor, load_predictor
from mlaas4hep.modelfiles.safety import (
    UnsafeModelError,
    check_model_file,
    import_tf_keras,
    load_keras_model,
)
from mlaas4hep.store.registry import RegistryError, check_model_name

#: TFaaS params keys as TFaaS served them, with the other spelling TFaaS has used.
PARAM_ALIASES = {"inputNode": "input_node", "outputNode": "output_node"}
PARAM_KEYS = (
    "name",
    "model",
    "labels",
    "options",
    "inputNode",
    "outputNode",
    "description",
    "timestamp",
)
DEFAULT_MODEL_FILE = "model.keras"
DEFAULT_LABELS_FILE = "labels.txt"
#: Files of a trained model's bundle besides ``DEFAULT_MODEL_FILE``.
SAVED_MODEL_DIR = "saved_model"
SIGNATURE = "serving_default"
ONNX_FILE = "model.onnx"
#: ONNX opset of exported models (supported by ONNX Runtime and Triton's ONNX backend).
ONNX_OPSET = 17


class BundleError(ValueError):
    """A bundle or an upload that cannot be used; the message names the file or field."""


class InputError(ValueError):
    """Prediction inputs that do not fit the model; the message says what is wrong."""


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what an upload may unpack to."""

    max_bytes: int = 512 * 1024**2
    max_member_bytes: int = 512 * 1024**2
    max_members: int = 10_000


# --------------------------------------------------------------------------- params


def normalize_params(data: Any, source: str = "params.json") -> dict[str, Any]:
    """TFaaS params with the camelCase keys TFaaS serves, from either spelling.

    Raises :class:`BundleError` when ``data`` is not an object, or gives both spellings
    of a key with different values.
    """
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
    params = dict(data)
    for camel, snake in PARAM_ALIASES.items():
        if snake in params:
            value = params.pop(snake)
            if camel in params and params[camel] != value:
                raise BundleError(
                    f"{source}: {camel!r} and {snake!r} disagree ({params[camel]!r} != {value!r})"
                )
            params[camel] = value
    for key in PARAM_KEYS:
        params.setdefault(key, None if key == "options" else "")
    if not isinstance(params["name"], str):
        raise BundleError(f"{source}: 'name' must be a string")
    params["model"] = params["model"] or DEFAULT_MODEL_FILE
    params["labels"] = params["labels"] or DEFAULT_LABELS_FILE
    for key in ("model", "labels"):
        if not isinstance(params[key], str) or not _is_relative(params[key]):
            raise BundleError(f"{source}: {key!r} must name a file inside the bundle")
    return params


def parse_params(raw: bytes | str, source: str = "params.json") -> dict[str, Any]:
    """Decode and normalize a params.json document."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"{source}: not valid JSON: {error}") from None
    return normalize_params(data, source)


def _is_relative(name: str) -> bool:
    norm = posixpath.normpath(name.replace("\\", "/"))
    return bool(name) and not norm.startswith(("/", "../")) and norm not in ("..", ".")


def read_labels(path: Path) -> list[str]:
    """Class labels of ``labels.txt`` (empty when the file does not exist)."""
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_bundle_dir(path: Path, name: str | None = None, match: bool = True) -> dict[str, Any]:
    """Check the files of a bundle folder (no TensorFlow); return its normalized params.

    ``name`` fills a missing params ``name``; with ``match`` it must equal the params' one
    (an upload), without it the registry's name wins (a registered bundle).
    """
    params_file = path / "params.json"
    if not params_file.is_file():
        raise BundleError("bundle has no params.json")
    params = parse_params(params_file.read_bytes())
    if not params["name"] or (name is not None and not match):
        params["name"] = name or params["name"]
    if not params["name"]:
        raise BundleError("params.json has no model 'name'")
    if name is not None and params["name"] != name:
        raise BundleError(
            f"params.json names model {params['name']!r} but the upload names {name!r}"
        )
    try:
        check_model_name(params["name"])
    except RegistryError as error:
        raise BundleError(str(error)) from None
    if not (path / params["model"]).exists():
        raise BundleError(f"bundle has no model file {params['model']!r} (params.json 'model')")
    for optional in ("specs.json", "metadata.json"):
        if (path / optional).is_file():
            try:
                json.loads((path / optional).read_bytes())
            except ValueError as error:
                raise BundleError(f"{optional}: not valid JSON: {error}") from None
    return params


def check_bundle_model(path: Path, params: dict[str, Any]) -> None:
    """Check the model file of the bundle folder ``path`` (``params`` from
    :func:`check_bundle_dir`) for code it would run, without loading it (a SavedModel's
    graph needs TensorFlow); :class:`BundleError` naming the file, layer and rule."""
    try:
        check_model_file(
            path / params["model"], compile=False, declared=params.get("format") or None
        )
    except UnsafeModelError as error:
        raise BundleError(str(error)) from None


def described_params(params: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """``params`` with what loading the model found (``info``, a
    :meth:`LoadedModel.describe`): its ``format``, its ``inputs``/``outputs`` tensors
    (names, shapes) and, where params named none, ``inputNode``/``outputNode``."""
    params = {**params, "format": info["format"]}
    params.update(inputs=info["inputs"], outputs=info["outputs"])
    for key, tensors in (("inputNode", info["inputs"]), ("outputNode", info["outputs"])):
        params[key] = params.get(key) or tensors[0]["name"]
    return params


def write_params(path: Path, params: dict[str, Any]) -> None:
    (path / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- uploads


def extract_tarball(data: bytes, dest: Path, limits: UploadLimits | None = None) -> Path:
    """Unpack a gzip tarball bundle into ``dest``; return the folder holding params.json.

    Refuses absolute or ``..`` paths, links and special files, members larger than
    ``limits.max_member_bytes`` and bundles over ``limits.max_bytes`` before writing
    any of their bytes.
    """
    unpack_tarball(data, dest, limits)
    return _bundle_root(dest)


def unpack_tarball(data: bytes, dest: Path, limits: UploadLimits | None = None) -> int:
    """Unpack any gzip tarball into ``dest`` with :func:`extract_tarball`'s checks; return
    the bytes written."""
    limits = limits or UploadLimits()
    if not data.startswith(b"\x1f\x8b"):
        raise BundleError("upload body is not a gzip tarball (no gzip header)")
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as archive:
            for member in archive:
                count += 1
                if count > limits.max_members:
                    raise BundleError(f"tarball has more than {limits.max_members} members")
                target = _member_target(member, dest)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if member.size > limits.max_member_bytes:
                    raise BundleError(
                        f"tarball member {member.name!r} is {member.size} bytes, "
                        f"more than the limit of {limits.max_member_bytes}"
                    )
                total += member.size
                if total > limits.max_bytes:
                    raise BundleError(f"tarball unpacks to more than {limits.max_bytes} bytes")
                stream = archive.extractfile(member)
                if stream is None:
                    raise BundleError(f"tarball member {member.name!r} cannot be read")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(stream.read())
    except (tarfile.TarError, EOFError, OSError) as error:
        raise BundleError(f"upload body is not a valid gzip tarball: {error}") from None
    return total


def _member_target(member: tarfile.TarInfo, dest: Path) -> Path:
    name = member.name
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"tarball member {name!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise BundleError(f"tarball member {name!r} leaves the bundle ('..' in its path)")
    if member.issym() or member.islnk():
        raise BundleError(f"tarball member {name!r} is a link (links are refused)")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"tarball member {name!r} is not a regular file or folder")
    return dest.joinpath(*[p for p in parts if p not in ("", ".")])


def _bundle_root(dest: Path) -> Path:
    """``dest`` or its single top-level folder, whichever holds params.json."""
    if (dest / "params.json").is_file():
        return dest
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "params.json").is_file():
        return entries[0]
    raise BundleError("tarball has no params.json at its top or in its single top folder")


def read_tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` by relative POSIX path (to ship a bundle between processes)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def write_tree(files: dict[str, bytes], path: Path) -> Path:
    """Write files produced by :func:`read_tree` below ``path``; return ``path``."""
    for rel, data in files.items():
        if not _is_relative(rel):
            raise BundleError(f"bundle file {rel!r} leaves the bundle")
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


# --------------------------------------------------------------------------- inputs


def to_matrix(values: Any, field: str = "values") -> np.ndarray:
    """A float32 ``[n_rows, n_columns]`` matrix from one row or a list of rows.

    ``None`` and NaN (padded values) become 0.0. Raises :class:`InputError` for
    non-numeric values, ragged rows or an empty input.
    """
    if not isinstance(values, list) or not values:
        raise InputError(f"{field!r} must be a non-empty list of numbers or of rows")
    rows = values if isinstance(values[0], list) else [values]
    width = len(rows[0])
    matrix = np.empty((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise InputError(f"{field}[{i}] must be a row (a list of numbers)")
        if len(row) != width:
            raise InputError(f"{field}[{i}] has {len(row)} values, row 0 has {width}")
        for j, value in enumerate(row):
            matrix[i, j] = _number(
                value, f"{field}[{i}][{j}]" if len(rows) > 1 else f"{field}[{j}]"
            )
    if width == 0:
        raise InputError(f"{field!r} rows are empty")
    return matrix


def _number(value: Any, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where} is {value!r}, not a number")
    return 0.0 if math.isnan(value) else float(value)


# --------------------------------------------------------------------------- loading


def feature_names_of(path: Path, n_features: int) -> list[str]:
    """Input feature names from metadata.json, else from specs.json (MLaaS4HEP order)."""
    try:
        names = json.loads((path / "metadata.json").read_bytes()).get("feature_names")
        if isinstance(names, list) and len(names) == n_features:
            return [str(n) for n in names]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        specs = json.loads((path / "specs.json").read_bytes())
        names = list(specs.get("fkeys", []))
        for key in specs.get("jkeys", []):
            names += [f"{key}_{i}" for i in range(int(specs["jdim"][key]))]
        if len(names) == n_features:
            return names
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return []


class LoadedModel:
    """A bundle loaded for inference: the model plus its params, labels and feature names."""

    def __init__(self, path: Path, name: str, version: int, numpy_dense: bool = True) -> None:
        self.name = name
        self.version = version
        self.params = check_bundle_dir(path, name, match=False)
        self.labels = read_labels(path / self.params["labels"])
        self.predictor = _load_predictor(path / self.params["model"], self.params, numpy_dense)
        shape_in = self.predictor.input.shape
        if len(shape_in) not in (2, 4) or None in shape_in[1:]:
            raise BundleError(
                f"model of {name!r} must take one [rows, features] or "
                f"[rows, height, width, channels] input, not {list(shape_in)}"
            )
        #: ``(height, width, channels)`` of an image model, else None
        self.image_shape = tuple(int(d) for d in shape_in[1:]) if len(shape_in) == 4 else None
        self.n_features = int(np.prod(shape_in[1:]))
        self._call = self.predictor.call
        self.n_outputs = _output_width(self.predictor, self.params["model"])
        self.feature_names = feature_names_of(path, self.n_features)
        self.specs = _specs_of(path / "specs.json", self.n_features)

    def columns_for(self, keys: list[str] | None, width: int) -> list[int] | None:
        """Column order that puts ``keys`` into the model's feature order (None: as sent)."""
        if width != self.n_features:
            raise InputError(
                f"model {self.name!r} takes {self.n_features} values a row, got {width}"
            )
        if not keys:
            return None
        if len(keys) != width:
            raise InputError(f"'keys' has {len(keys)} names but rows have {width} values")
        if self.feature_names and set(keys) == set(self.feature_names) and len(set(keys)) == width:
            order = {key: i for i, key in enumerate(keys)}
            columns = [order[name] for name in self.feature_names]
            return None if columns == list(range(width)) else columns
        return None

    def reorder(self, matrix: np.ndarray, keys: list[str] | None) -> np.ndarray:
        """``matrix`` with its columns (named by ``keys``) in the model's feature order."""
        columns = self.columns_for(keys, matrix.shape[1])
        return matrix if columns is None else matrix[:, columns]

    def events_matrix(self, events: Any) -> np.ndarray:
        """Model input for raw physics events (branch -> value(s)), flattened with the
        bundle's specs.json exactly as the training data was."""
        from mlaas4hep.data.flatten import flatten_events, to_model_input

        if self.specs is None:
            raise InputError(f"model {self.name!r} has no specs.json: send 'values' instead")
        if not isinstance(events, dict | list) or not events:
            raise InputError("'events' must be an event (branch -> value) or a list of events")
        try:
            return to_model_input(flatten_events(events, self.specs))
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"'events': {error}") from None

    def image_matrix(self, data: bytes) -> np.ndarray:
        """One image file (PNG, JPEG, ...) as a ``[1, n_features]`` row: decoded, converted to
        the model's channels, resized to its height and width, scaled to [0, 1]."""
        if self.image_shape is None:
            raise InputError(f"model {self.name!r} is not an image model: send 'values' instead")
        from PIL import Image, UnidentifiedImageError

        height, width, channels = self.image_shape
        if channels not in (1, 3, 4):
            raise InputError(f"model {self.name!r} takes {channels} channels; images have 1, 3, 4")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
                pixels = np.asarray(image.resize((width, height)), dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputError(f"'image' cannot be decoded as an image: {error}") from None
        return (pixels / 255.0).reshape(1, self.n_features)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Model outputs as a float32 ``[n_rows, n_outputs]`` array (image models take rows
        of ``height * width * channels`` pixels)."""
        if self.image_shape is not None:
            matrix = matrix.reshape(matrix.shape[0], *self.image_shape)
        out = self._call(matrix)
        return out.astype(np.float32, copy=False).reshape(matrix.shape[0], self.n_outputs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "feature_names": self.feature_names,
            "labels": self.labels,
            "params": self.params,
            "has_specs": self.specs is not None,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            **self.predictor.describe(),
        }


#: The legacy Keras module (``tf_keras``), importing TensorFlow on first use.
import_keras = import_tf_keras


def _load_predictor(path: Path, params: dict[str, Any], numpy_dense: bool) -> Predictor:
    """The model of the bundle file/folder ``path``, checked and loaded as its format;
    :class:`BundleError` naming the file (and the refused layer or op, or the format
    expected) otherwise."""
    if not path.exists():
        raise BundleError(f"model file {path.name!r} not found in the bundle")
    try:
        return load_predictor(path, params, numpy_dense)
    except (UnsafeModelError, ModelFileError) as error:
        raise BundleError(str(error)) from None
    except Exception as error:  # Keras raises many types for a corrupt file
        raise BundleError(f"model file {path.name!r} cannot be loaded: {error}") from None


def _output_width(predictor: Predictor, file: str) -> int:
    """Outputs per row of ``predictor``, found by running it on one row of zeros (a model
    that cannot run is refused at load, not at its first request)."""
    row = np.zeros((1, *predictor.input.shape[1:]), dtype=np.float32)
    try:
        out = np.asarray(predictor(row))
    except Exception as error:  # each runtime raises its own types
        raise BundleError(f"model file {file!r} cannot be run on one row: {error}") from None
    if out.ndim == 0 or out.shape[0] != 1 or out.size == 0:
        raise BundleError(
            f"model file {file!r} gives outputs of shape {list(out.shape)} for one row; "
            "expected [1, outputs]"
        )
    return int(out.size)


def _specs_of(path: Path, n_features: int) -> Any:
    """The bundle's :class:`FeatureSpecs`, or None when it has no specs.json."""
    if not path.is_file():
        return None
    from mlaas4hep.data.features import FeatureSpecs

    try:
        specs = FeatureSpecs.from_dict(json.loads(path.read_bytes()))
    except (ValueError, TypeError, AttributeError) as error:
        raise BundleError(f"specs.json: {error}") from None
    if specs.n_features != n_features:
        raise BundleError(
            f"specs.json describes {specs.n_features} features but the model takes {n_features}"
        )
    return specs


def load_bundle(path: Path, name: str, version: int, numpy_dense: bool = True) -> LoadedModel:
    """Load the bundle at ``path`` (imports TensorFlow); :class:`BundleError` if unusable.

    A ``Sequential`` stack of ``Dense`` layers predicts as a numpy forward pass unless
    ``numpy_dense`` is False; every other model (and then that one) through its traced
    Keras graph.
    """
    return LoadedModel(path, name, version, numpy_dense)


# --------------------------------------------------------------------------- writing


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True))


def _export_saved_model(model, path: Path) -> tuple[str, str]:
    """Save ``model`` as a SavedModel at ``path``; return its input and output node names."""
    import tensorflow as tf

    tf.saved_model.save(model, str(path))
    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    _, inputs = signature.structured_input_signature
    return next(iter(inputs)), next(iter(signature.structured_outputs))


def export_onnx(model, path: Path, opset: int = ONNX_OPSET) -> str:
    """Write ``model`` (one 2-D float input) as ONNX at ``path``; return its output name."""
    import tensorflow as tf
    import tf2onnx

    n_features = model.inputs[0].shape[-1]
    signature = [tf.TensorSpec((None, n_features), tf.float32, name="features")]
    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=signature, opset=opset, output_path=str(path)
    )
    return proto.graph.output[0].name


def write_bundle(
    out_dir: str | Path,
    model_dir: str | Path,
    *,
    name: str,
    specs: dict[str, Any] | None,
    feature_names: list[str],
    labels: list[str],
    metrics: dict[str, Any],
    owner: str,
    run_id: str,
    spec_json: str,
    description: str | None = None,
    onnx: bool = False,
) -> Path:
    """Write the bundle of the model in ``model_dir`` (holding ``model.keras``) to ``out_dir``.

    ``specs`` is the MLaaS4HEP specs mapping, ``feature_names`` the model input order,
    ``labels`` the class labels, ``metrics`` the test metrics and ``spec_json`` the
    pipeline spec (its sha256 goes into metadata.json); ``onnx`` adds ``model.onnx``.
    Returns ``out_dir``.
    """
    out, source = Path(out_dir), Path(model_dir) / DEFAULT_MODEL_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no trained model to bundle")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / DEFAULT_MODEL_FILE)
    model = load_keras_model(out / DEFAULT_MODEL_FILE)  # its layers came from a user's model file
    if model.inputs and model.inputs[0].shape[-1] != len(feature_names):
        raise ValueError(
            f"{source}: the model takes {model.inputs[0].shape[-1]} inputs but "
            f"{len(feature_names)} feature names were given"
        )
    input_node, output_node = _export_saved_model(model, out / SAVED_MODEL_DIR)
    onnx_info = (
        {"file": ONNX_FILE, "input": "features", "output": export_onnx(model, out / ONNX_FILE)}
        if onnx
        else None
    )
    created = datetime.now(UTC).isoformat(timespec="seconds")

    if specs is not None:
        _write_json(out / "specs.json", specs)
    (out / DEFAULT_LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    auc = metrics.get("auc")
    write_params(
        out,
        {
            "name": name,
            "model": DEFAULT_MODEL_FILE,
            "format": "tf_keras",
            "labels": DEFAULT_LABELS_FILE,
            "inputNode": input_node,
            "outputNode": output_node,
            "description": description
            or f"{name}: trained by run {run_id}"
            + (f", test AUC {auc:.4f}" if isinstance(auc, float) else ""),
            "timestamp": created,
        },
    )
    _write_json(
        out / "metadata.json",
        {
            "name": name,
            "owner": owner,
            "run_id": run_id,
            "spec_sha256": hashlib.sha256(spec_json.encode()).hexdigest(),
            "spec": json.loads(spec_json),
            "metrics": metrics,
            "feature_names": list(feature_names),
            "n_features": len(feature_names),
            "labels": list(labels),
            "saved_model": SAVED_MODEL_DIR,
            "onnx": onnx_info,
            "created": created,
        },
    )
    return out
