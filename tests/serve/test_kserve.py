"""KServe v2 / Open Inference Protocol routes, with Triton's HTTP client and raw HTTP."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from serve_fixtures import local_predict

pytestmark = pytest.mark.ray

X = np.random.default_rng(42).normal(size=(6, 4)).astype(np.float32)


@pytest.fixture
def triton(tfaas):
    """A ``tritonclient`` HTTP client of the test app (host:port/base-path)."""
    http = pytest.importorskip("tritonclient.http")
    url = urlparse(tfaas.url)
    client = http.InferenceServerClient(url=f"{url.netloc}{url.path}")
    yield client
    client.close()


def _infer(triton, tfaas, model, binary, version=""):
    import tritonclient.http as http

    tensor = http.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    output = http.InferRequestedOutput("output", binary_data=binary)
    return triton.infer(
        model, [tensor], model_version=version, outputs=[output], headers=tfaas.headers()
    )


def test_health_and_server_metadata_need_no_token(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "mlaas4hep"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_gives_input_and_output_shapes(triton, tfaas, multi):
    metadata = triton.get_model_metadata("multi", headers=tfaas.headers())
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert triton.is_model_ready("multi", headers=tfaas.headers())
    assert triton.is_model_ready("multi", model_version="1", headers=tfaas.headers())
    assert not triton.is_model_ready("nosuch", headers=tfaas.headers())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_client_inference_equals_local_model(triton, tfaas, multi, binary):
    result = _infer(triton, tfaas, "multi", binary, version="1")
    np.testing.assert_allclose(
        result.as_numpy("output"), local_predict(multi, X), rtol=1e-6, atol=1e-7
    )
    response = result.get_response()
    assert response["model_name"] == "multi" and response["model_version"] == "1"


def _post(tfaas, path, body, sub="alice"):
    with httpx.Client(base_url=tfaas.url, headers=tfaas.headers(sub), timeout=60) as client:
        return client.post(path, content=json.dumps(body))


def test_raw_json_inference_with_nested_data_and_request_id(tfaas, higgs):
    body = {
        "id": "req-7",
        "inputs": [{"name": "input", "shape": [6, 4], "datatype": "FP64", "data": X.tolist()}],
    }
    answer = _post(tfaas, "/v2/models/higgs/infer", body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["id"] == "req-7"
    out = result["outputs"][0]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [6, 1]
    np.testing.assert_allclose(out["data"], local_predict(higgs, X)[:, 0], rtol=1e-6, atol=1e-7)


def _tensor(**overrides):
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", **overrides}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/higgs/infer", _tensor(data=[1, 2, 3]), 400, "does not fit FP32 [1, 4]"),
        ("/v2/models/higgs/infer", _tensor(data=[1, 2, 3, "x"]), 400, "does not fit FP32"),
        ("/v2/models/higgs/infer", _tensor(datatype="BYTES", data=["a"]), 400, "not supported"),
        ("/v2/models/higgs/infer", _tensor(shape=[1, 2, 2], data=[1] * 4), 400, "'shape' must"),
        ("/v2/models/higgs/infer", _tensor(), 400, "has no 'data'"),
        ("/v2/models/higgs/infer", {"inputs": []}, 400, "'inputs' must be a list of one"),
        (
            "/v2/models/higgs/infer",
            {**_tensor(data=[1, 2, 3, 4]), "outputs": [{"name": "prob"}]},
            400,
            "unknown output 'prob'",
        ),
        (
            "/v2/models/higgs/infer",
            _tensor(shape=[1, 3], data=[1, 2, 3]),
            400,
            "takes 4 values a row, got 3",
        ),
        ("/v2/models/nosuch/infer", _tensor(data=[1, 2, 3, 4]), 404, "model 'nosuch' not found"),
        (
            "/v2/models/higgs/versions/9/infer",
            _tensor(data=[1, 2, 3, 4]),
            404,
            "has no version 9",
        ),
    ],
)
def test_bad_inference_requests_get_a_clear_client_error(tfaas, higgs, path, body, status, message):
    answer = _post(tfaas, path, body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_inference_needs_a_token_and_access_to_the_model(tfaas, higgs):
    body = _tensor(data=[1, 2, 3, 4])
    with httpx.Client(base_url=tfaas.url, timeout=60) as client:
        anonymous = client.post("/v2/models/higgs/infer", json=body)
    assert anonymous.status_code == 401
    assert _post(tfaas, "/v2/models/higgs/infer", body, sub="bob").status_code == 404


def test_binary_request_with_a_wrong_size_is_refused(tfaas, higgs):
    header = json.dumps(
        {"inputs": [{**_tensor()["inputs"][0], "parameters": {"binary_data_size": 16}}]}
    ).encode()
    with httpx.Client(base_url=tfaas.url, headers=tfaas.headers(), timeout=60) as client:
        answer = client.post(
            "/v2/models/higgs/infer",
            content=header + b"\0" * 12,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    assert answer.status_code == 400
    assert "binary_data_size 16 != 12 bytes sent" in answer.json()["error"]
