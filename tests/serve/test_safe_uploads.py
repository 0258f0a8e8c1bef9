"""Unsafe model files over real HTTP on the real TFaaS Serve app: refused with 4xx naming
the file and the layer, and nothing of them runs in the Serve replicas (the marker file
their Lambda would write never appears, after the upload nor after predicting)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safe_model_fixtures import custom_layer_model_file, lambda_model_file
from serve_fixtures import N_FEATURES, bundle_tarball

pytestmark = pytest.mark.ray

#: Fewer rows than ``direct_max_rows`` (predicted in the ingress) and more (model replicas).
FEW_ROWS = np.zeros((2, N_FEATURES), dtype=np.float32).tolist()
MANY_ROWS = np.zeros((40, N_FEATURES), dtype=np.float32).tolist()


def hostile_bundle(folder: Path, name: str, model_file: str, marker: Path) -> Path:
    """A bundle whose ``model_file`` (.h5 or .keras) has the marking Lambda layer."""
    folder.mkdir(parents=True, exist_ok=True)
    lambda_model_file(folder / model_file, marker, N_FEATURES)
    (folder / "params.json").write_text(json.dumps({"name": name, "model": model_file}))
    return folder


def test_an_h5_upload_with_a_lambda_is_refused_and_its_code_never_runs(tfaas, tmp_path):
    marker = tmp_path / "lambda-ran.marker"
    bundle = hostile_bundle(tmp_path / "b", "lambda-h5", "model.h5", marker)
    files = {
        "params": ("params.json", (bundle / "params.json").read_bytes()),
        "model": ("model.h5", (bundle / "model.h5").read_bytes()),
    }
    with tfaas.client() as client:
        upload = client.post("/upload", data={"name": "lambda-h5"}, files=files)
        assert not marker.exists()
        predicted = client.post("/json", json={"values": FEW_ROWS, "model": "lambda-h5"})
    assert upload.status_code == 400, upload.text
    assert upload.json()["error"].startswith("model.h5 (model_config): layer 'lambda' (Lambda)")
    assert predicted.status_code == 404, predicted.text
    assert tfaas.registry.versions("lambda-h5") == []
    assert not marker.exists()


def test_a_keras_tarball_with_an_unknown_custom_layer_is_refused(tfaas, tmp_path):
    marker = tmp_path / "custom-ran.marker"
    bundle = tmp_path / "b"
    bundle.mkdir()
    custom_layer_model_file(bundle / "model.keras", marker, N_FEATURES)
    (bundle / "params.json").write_text(json.dumps({"name": "custom-layer"}))
    with tfaas.client() as client:
        answer = client.post("/upload", content=bundle_tarball(bundle))
    assert answer.status_code == 400, answer.text
    assert "'marking' (Marking) registered as 'tenant>Marking'" in answer.json()["error"]
    assert answer.json()["error"].startswith("model.keras (config.json)")
    assert tfaas.registry.versions("custom-layer") == []
    assert not marker.exists()


@pytest.mark.parametrize("rows", [FEW_ROWS, MANY_ROWS], ids=["ingress", "model-replica"])
def test_a_lambda_bundle_written_into_storage_fails_to_load_and_never_runs(tfaas, tmp_path, rows):
    name = f"planted-{len(rows)}"
    marker = tmp_path / "planted-ran.marker"
    bundle = hostile_bundle(tmp_path / "b", name, "model.h5", marker)
    tfaas.registry.register(name, bundle, owner=tfaas.owner("alice"))  # behind the API
    with tfaas.client() as client:
        answer = client.post("/json", json={"values": rows, "model": name})
    assert answer.status_code == 400, answer.text
    assert "model.h5 (model_config): layer 'lambda' (Lambda)" in answer.json()["error"]
    assert not marker.exists()
