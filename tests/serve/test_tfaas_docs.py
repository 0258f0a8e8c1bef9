"""The request shapes of TFaaS's own documentation (its curl examples, sent with httpx and a
bearer token) get the answers TFaaS documents, including image models."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from serve_fixtures import bundle_tarball, local_predict, make_bundle, make_image_bundle

from mlaas4hep.serve.protocols import tfaas_pb2

pytestmark = pytest.mark.ray

#: the keys TFaaS's /models answer gives for every model
TFAAS_MODEL_KEYS = set(
    ["name", "model", "labels", "options", "inputNode", "outputNode", "description", "timestamp"]
)


def png(pixels: np.ndarray) -> bytes:
    """A grey-scale PNG of a uint8 matrix."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_documented_upload_models_json_proto_params_delete_requests(tfaas, tmp_path):
    # params.json as in TFaaS's curl client docs, with a labels.csv file as in its Go docs
    bundle = make_bundle(tmp_path / "luca", "luca", seed=21)
    params = {
        "name": "luca",
        "model": "model.keras",
        "labels": "labels.csv",
        "inputNode": "dense_4_input",
        "outputNode": "output_node0",
    }
    with tfaas.client() as client:
        # curl -X POST /upload -F 'name=luca' -F 'params=@params.json' -F 'model=@...' -F ...
        uploaded = client.post(
            "/upload",
            data={"name": "luca"},
            files={
                "params": ("params.json", json.dumps(params).encode()),
                "model": ("model.keras", (bundle / "model.keras").read_bytes()),
                "labels": ("labels.csv", b"background\nsignal\n"),
            },
        )
        # curl /models/
        models = client.get("/models/")
        # curl -XPOST -d '{"keys":[...],"values":[...], "model":"luca"}' /json (form content type)
        values = [1.1, 2.0, -0.5, 91.0]
        body = json.dumps({"keys": ["a", "b", "c", "d"], "values": values, "model": "luca"})
        predicted = client.post(
            "/json",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        # scripts/request input.msg /proto: key, value, model
        row = tfaas_pb2.Row(key=["a", "b", "c", "d"], value=values, model="luca")
        proto = client.post("/proto", content=row.SerializeToString())
        # curl -X POST -H "Content-type: application/json" -d @params.json /params; curl /params
        default = client.post("/params", json={**params, "description": "my favorite model"})
        current = client.get("/params")
        # curl -X DELETE /delete?model=luca
        deleted = client.delete("/delete", params={"model": "luca"})
        gone = client.post("/json", content=body)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["name"] == "luca"
    assert models.status_code == 200, models.text
    entry = next(m for m in models.json() if m["name"] == "luca")
    assert set(entry) >= TFAAS_MODEL_KEYS
    assert {k: entry[k] for k in ("model", "labels", "options", "inputNode", "outputNode")} == {
        "model": "model.keras",
        "labels": "labels.csv",
        "options": None,
        "inputNode": "dense_4_input",
        "outputNode": "output_node0",
    }
    assert predicted.status_code == 200, predicted.text
    expected = local_predict(bundle, np.array([values]))[0]
    np.testing.assert_allclose(predicted.json(), expected, rtol=1e-6)
    (only,) = tfaas_pb2.Predictions.FromString(proto.content).prediction
    assert only.label == "signal"
    np.testing.assert_allclose(only.probability, expected[0], rtol=1e-6)
    assert default.status_code == 200, default.text
    assert current.json()["name"] == "luca" and set(current.json()) >= TFAAS_MODEL_KEYS
    assert deleted.status_code == 200, deleted.text
    assert gone.status_code == 404 and gone.json() == {"error": "model 'luca' not found"}


def test_documented_gzip_tarball_upload_and_image_prediction(tfaas, tmp_path):
    bundle = make_image_bundle(tmp_path / "mnist", "mnist")
    image = np.zeros((16, 16), dtype=np.uint8)
    image[4:12, 6:10] = 255  # a "1", drawn twice the model's size: the server resizes it
    with tfaas.client() as client:
        # tar cfz mnist.tar.gz mnist; curl -X POST -H "Content-Encoding: gzip"
        #   -H "Content-Type: application/octet-stream" --data-binary @mnist.tar.gz /upload
        uploaded = client.post(
            "/upload",
            content=bundle_tarball(bundle, top="mnist"),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )
        # curl /predict/image -F 'image=@./img1.png' -F 'model=mnist'
        files = {"image": ("img1.png", png(image), "image/png")}
        answers = [
            client.post(path, files=files, data={"model": "mnist"})
            for path in ("/predict/image", "/image")
        ]
    assert uploaded.status_code == 200, uploaded.text
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((8, 8)), dtype=np.float32) / 255.0
    expected = local_predict(bundle, resized.reshape(1, 8, 8, 1))[0]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert len(answer.json()) == 3
        np.testing.assert_allclose(answer.json(), expected, rtol=1e-5)


def test_bad_image_requests_get_a_clear_client_error(tfaas, tmp_path):
    make_image_bundle(tmp_path / "pics", "pics")
    tabular = make_bundle(tmp_path / "tab", "tabular", seed=22)
    tfaas.registry.register("pics", tmp_path / "pics", owner=tfaas.owner("alice"))
    tfaas.registry.register("tabular", tabular, owner=tfaas.owner("alice"))
    picture = {"image": ("a.png", png(np.zeros((8, 8), dtype=np.uint8)), "image/png")}
    with tfaas.client() as client:
        not_image = client.post(
            "/image", files={"image": ("a.png", b"not a png")}, data={"model": "pics"}
        )
        no_file = client.post("/image", files={"other": ("a", b"x")}, data={"model": "pics"})
        wrong_model = client.post("/image", files=picture, data={"model": "tabular"})
        pixels = client.post("/json", json={"values": [0.5] * 64, "model": "pics"})
    assert not_image.status_code == 400
    assert "'image' cannot be decoded as an image" in not_image.json()["error"]
    assert no_file.status_code == 400
    assert no_file.json() == {"error": "image request lacks the 'image' file"}
    assert wrong_model.status_code == 400
    assert wrong_model.json() == {
        "error": "model 'tabular' is not an image model: send 'values' instead"
    }
    assert pixels.status_code == 200 and len(pixels.json()) == 3  # flattened pixels via /json
