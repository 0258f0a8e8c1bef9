"""KServe v2 / Open Inference Protocol over gRPC, with Triton's unchanged gRPC client.

Against the session's TFaaS app: its ingress replicas serve ``inference.
GRPCInferenceService`` on ``grpc_port``; the client passes only the bearer token
(``authorization`` metadata), as CMSSW's SONIC client would, and no Serve metadata.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from serve_fixtures import local_predict

pytestmark = pytest.mark.ray

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

X = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def client(tfaas):
    """A ``tritonclient.grpc`` client of the session app's gRPC port."""
    client = grpcclient.InferenceServerClient(url=tfaas.settings.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(tfaas):
    """The raw ``GRPCInferenceService`` stub (for typed ``contents`` and bad requests)."""
    with grpc.insecure_channel(tfaas.settings.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def auth(tfaas, sub: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {tfaas.token(sub)}"}


def infer(client, tfaas, model, x, datatype="FP32", sub="alice", version=""):
    tensor = grpcclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    output = grpcclient.InferRequestedOutput("output")
    return client.infer(
        model, [tensor], model_version=version, outputs=[output], headers=auth(tfaas, sub)
    )


def refusal(call) -> tuple[str, str]:
    """``(status code, message)`` of a call the server refuses."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_liveness_readiness_and_server_metadata_need_no_token(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "mlaas4hep"


def test_model_metadata_gives_input_and_output_shapes(client, tfaas, multi):
    metadata = client.get_model_metadata("multi", headers=auth(tfaas))
    assert metadata.name == "multi" and list(metadata.versions) == ["1"]
    (tensor_in,) = metadata.inputs
    (tensor_out,) = metadata.outputs
    assert (tensor_in.name, tensor_in.datatype, list(tensor_in.shape)) == ("input", "FP32", [-1, 4])
    assert (tensor_out.name, tensor_out.datatype, list(tensor_out.shape)) == (
        "output",
        "FP32",
        [-1, 3],
    )
    assert client.is_model_ready("multi", headers=auth(tfaas))
    assert client.is_model_ready("multi", model_version="1", headers=auth(tfaas))
    assert not client.is_model_ready("nosuch", headers=auth(tfaas))


@pytest.mark.parametrize("rows", [6, 40], ids=["in-ingress", "model-deployment"])
def test_fp32_raw_inference_equals_the_models_own_outputs(client, tfaas, multi, rows):
    x = np.random.default_rng(rows).normal(size=(rows, 4)).astype(np.float32)
    result = infer(client, tfaas, "multi", x, version="1")
    np.testing.assert_allclose(result.as_numpy("output"), local_predict(multi, x), atol=1e-4)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("multi", "1")


@pytest.mark.parametrize("datatype", ["FP64", "INT32"])
def test_other_datatypes_are_converted_to_the_models_float_input(client, tfaas, higgs, datatype):
    x = (X * 3).astype(np.float64 if datatype == "FP64" else np.int32)
    result = infer(client, tfaas, "higgs", x, datatype=datatype)
    expected = local_predict(higgs, x.astype(np.float32))
    np.testing.assert_allclose(result.as_numpy("output"), expected, atol=1e-4)


def test_typed_contents_are_accepted_beside_raw_input_contents(stub, tfaas, higgs):
    request = service_pb2.ModelInferRequest(model_name="higgs", id="req-9")
    tensor = request.inputs.add(name="input", datatype="FP64", shape=list(X.shape))
    tensor.contents.fp64_contents.extend(X.astype(np.float64).ravel().tolist())
    answer = stub.ModelInfer(request, metadata=list(auth(tfaas).items()))
    assert answer.id == "req-9" and list(answer.outputs[0].shape) == [6, 1]
    out = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(6, 1)
    np.testing.assert_allclose(out, local_predict(higgs, X), atol=1e-4)


@pytest.mark.parametrize(
    "headers",
    [None, {"authorization": "Bearer not-a-jwt"}, {"authorization": "Basic YWxpY2U6eA=="}],
    ids=["missing", "invalid", "not-bearer"],
)
def test_a_missing_or_bad_token_is_unauthenticated(client, higgs, headers):
    tensor = grpcclient.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    code, _ = refusal(lambda: client.infer("higgs", [tensor], headers=headers))
    assert code == "StatusCode.UNAUTHENTICATED"
    code, _ = refusal(lambda: client.get_model_metadata("higgs", headers=headers))
    assert code == "StatusCode.UNAUTHENTICATED"


def test_another_users_private_model_is_not_found(client, tfaas, higgs):
    code, message = refusal(lambda: infer(client, tfaas, "higgs", X, sub="bob"))
    assert (code, message) == ("StatusCode.NOT_FOUND", "model 'higgs' not found")
    code, _ = refusal(lambda: client.get_model_metadata("higgs", headers=auth(tfaas, "bob")))
    assert code == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("higgs", headers=auth(tfaas, "bob"))


def test_unknown_models_and_versions_are_not_found(client, tfaas, higgs):
    code, message = refusal(lambda: infer(client, tfaas, "nosuch", X))
    assert code == "StatusCode.NOT_FOUND" and "model 'nosuch' not found" in message
    code, message = refusal(lambda: infer(client, tfaas, "higgs", X, version="9"))
    assert code == "StatusCode.NOT_FOUND" and "has no version 9" in message


def _request(datatype="FP32", shape=(1, 4), raw=b"\0" * 16, output="output"):
    request = service_pb2.ModelInferRequest(model_name="higgs")
    request.inputs.add(name="input", datatype=datatype, shape=list(shape))
    request.outputs.add(name=output)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(shape=(1, 3), raw=b"\0" * 12), "takes 4 values a row, got 3"),
        (_request(raw=b"\0" * 12), "data does not fit FP32 [1, 4]"),
        (_request(datatype="BYTES"), "datatype 'BYTES' not supported"),
        (_request(shape=(1, 2, 2)), "'shape' must be [features] or [rows, features]"),
        (_request(datatype="FP16", shape=(1, 4), raw=None), "FP16 needs raw_input_contents"),
        (_request(output="prob"), "unknown output 'prob'"),
        (service_pb2.ModelInferRequest(model_name="higgs"), "'inputs' must hold one tensor"),
    ],
    ids=["features", "raw-size", "datatype", "shape", "fp16-typed", "output", "no-input"],
)
def test_bad_tensors_are_invalid_arguments_with_the_rule(stub, tfaas, higgs, request_, message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, metadata=list(auth(tfaas).items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def _autoscaling_context(http_requests: float, grpc_calls: list[float]):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from mlaas4hep.serve.protocols.kserve_grpc import ONGOING_METRIC

    deployment = DeploymentID(name="TFaaSIngress", app_name="tfaas")
    replicas = [ReplicaID(f"r{i}", deployment) for i in range(len(grpc_calls))]
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name="TFaaSIngress",
        app_name="tfaas",
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=replicas,
        total_num_requests=http_requests,
        total_queued_requests=0.0,
        aggregated_metrics={ONGOING_METRIC: dict(zip(replicas, grpc_calls, strict=True))},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=8),
    )


def test_ingress_autoscaling_counts_grpc_calls_beside_http_requests():
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    from mlaas4hep.serve.protocols.kserve_grpc import ingress_autoscaling_policy

    http_only = _autoscaling_context(16.0, [0.0, 0.0])
    assert ingress_autoscaling_policy(http_only)[0] == pytest.approx(
        replica_queue_length_autoscaling_policy(http_only)[0]
    )
    # 16 HTTP requests and 24 gRPC calls over 2 replicas at 8 a replica: 5 replicas
    assert ingress_autoscaling_policy(_autoscaling_context(16.0, [10.0, 14.0]))[0] == 5.0
