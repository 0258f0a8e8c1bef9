"""Write a trained model as a bundle the registry and the TFaaS server load.

A bundle folder holds::

    model.keras     the Keras model (legacy Keras 2, ``tf_keras``)
    saved_model/    the same model as a TensorFlow SavedModel (``serving_default``)
    specs.json      MLaaS4HEP specs: jdim, minv, maxv, fkeys, jkeys, nans, events
    params.json     TFaaS params: name, model, labels, inputNode, outputNode, ...
    labels.txt      one class label a line
    metadata.json   owner, run_id, spec_sha256, metrics, feature_names, created
    model.onnx      optional: the same model in ONNX (Triton/SONIC), input ``features``
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ["TF_USE_LEGACY_KERAS"] = "1"

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
SIGNATURE = "serving_default"
ONNX_FILE = "model.onnx"
#: ONNX opset of exported models (supported by ONNX Runtime and Triton's ONNX backend).
ONNX_OPSET = 17


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
    from mlaas4hep.platform.safe_models import load_keras_model

    out, source = Path(out_dir), Path(model_dir) / MODEL_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no trained model to bundle")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / MODEL_FILE)
    model = load_keras_model(out / MODEL_FILE)  # its layers came from a user's model file
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
    (out / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    auc = metrics.get("auc")
    _write_json(
        out / "params.json",
        {
            "name": name,
            "model": MODEL_FILE,
            "format": "tf_keras",
            "labels": "labels.txt",
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
