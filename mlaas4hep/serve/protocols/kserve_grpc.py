"""KServe v2 / Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

Served by every ingress replica of the inference service on ``grpc_port`` (setting
``MLAAS4HEP_GRPC_PORT``, default 9000; 0 turns it off), beside its HTTP routes. Each
replica runs a small ``grpc.aio`` server on the replica's own event loop; the replicas of
a node share the port (``SO_REUSEPORT``: the kernel spreads connections over them), so
clients send no Serve ``application`` metadata and need no other change than the
bearer token::

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient("localhost:9000")
    auth = {"authorization": f"Bearer {token}"}
    x = grpcclient.InferInput("input", [rows, features], "FP32")
    x.set_data_from_numpy(matrix)
    result = client.infer("higgs", [x], headers=auth)
    result.as_numpy("output")

The RPCs are those of the KServe v2 REST routes (:mod:`mlaas4hep.serve.protocols.kserve_v2`),
over the same data plane (:class:`~mlaas4hep.serve.dataplane.DataPlane`): the same token
validation and ``use`` right, the same access rules (another tenant's private model is
``NOT_FOUND`` like a missing one), the same tensor rules
(:func:`~mlaas4hep.serve.protocols.kserve_v2.tensor_matrix`) and prediction path (small
requests in the replica, larger ones on the autoscaled, batching model deployment). Inputs
come as ``raw_input_contents`` (what ``tritonclient`` sends) or typed ``contents``; the output is
returned as ``raw_output_contents`` (little-endian FP32). Refusals are gRPC status codes
with the REST route's message: ``UNAUTHENTICATED`` (missing or bad token),
``PERMISSION_DENIED``, ``NOT_FOUND``, ``INVALID_ARGUMENT`` (bad tensors),
``RESOURCE_EXHAUSTED`` (a message over ``max_request_bytes``).

The message classes are generated from ``grpc_predict_v2.proto`` (``make grpc-protos``)
into a private descriptor pool, so a process may import ``tritonclient.grpc`` (which
defines the same ``inference.*`` names) as well.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from ray.serve.config import AutoscalingContext

from mlaas4hep.auth.oidc import AuthError, Principal
from mlaas4hep.serve.errors import ApiError
from mlaas4hep.serve.protocols import grpc_predict_v2_pb2 as pb
from mlaas4hep.serve.protocols import grpc_predict_v2_pb2_grpc as pb_grpc
from mlaas4hep.serve.protocols import kserve_v2
from mlaas4hep.serve.security import bearer_token

if TYPE_CHECKING:
    from mlaas4hep.serve.dataplane import DataPlane

logger = logging.getLogger(__name__)

#: gRPC status of each HTTP status the REST routes answer with.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

#: The ``InferTensorContents`` field holding each datatype's typed values (FP16 has
#: none: it travels as raw bytes only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

#: Custom autoscaling metric of the ingress replicas: gRPC calls being answered.
ONGOING_METRIC = "grpc_ongoing_requests"

#: Maps a domain error to its client answer (``tfaas.api_error_of``), None if unknown.
KnownError = Callable[[BaseException], ApiError | None]


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status code of an HTTP status (``INTERNAL`` for unknown ones)."""
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)


def request_matrix(request: Any) -> np.ndarray:
    """The float32 ``[rows, features]`` matrix of a ``ModelInferRequest``'s one input.

    Takes the tensor's values from ``raw_input_contents`` when the request has them,
    else from the typed ``contents`` field of its datatype. :class:`ApiError` (400)
    naming the input and the rule otherwise.
    """
    if len(request.inputs) != 1:
        raise ApiError(400, "'inputs' must hold one tensor (the [rows, features] input)")
    tensor = request.inputs[0]
    name = tensor.name or kserve_v2.INPUT_NAME
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ApiError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if raw and tensor.HasField("contents"):
        raise ApiError(400, f"input {name!r} has both raw_input_contents and contents")
    data = None
    if not raw:
        field = CONTENTS_FIELDS.get(tensor.datatype)
        if field is None and tensor.datatype in kserve_v2.DATATYPES:
            raise ApiError(400, f"input {name!r}: {tensor.datatype} needs raw_input_contents")
        data = list(getattr(tensor.contents, field)) if field else []
    return kserve_v2.tensor_matrix(
        name, tensor.datatype, list(tensor.shape), raw=raw[0] if raw else None, data=data
    )


def infer_response(request: Any, name: str, version: int, out: np.ndarray) -> Any:
    """The ``ModelInferResponse`` of outputs ``out``, as raw little-endian FP32."""
    answer = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request.id)
    answer.outputs.add(name=kserve_v2.OUTPUT_NAME, datatype="FP32", shape=list(out.shape))
    answer.raw_output_contents.append(np.ascontiguousarray(out, dtype="<f4").tobytes())
    return answer


def metadata_response(metadata: dict[str, Any]) -> Any:
    """The ``ModelMetadataResponse`` of the REST routes' model metadata ``metadata``."""
    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["inputs"]],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["outputs"]],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs of ``inference.GRPCInferenceService`` over a :class:`DataPlane`.

    ``known_error`` maps the service's domain errors (unknown model, bad bundle or input)
    to their client answer, as the HTTP app's handlers do.
    """

    def __init__(self, service: DataPlane, known_error: KnownError) -> None:
        self.service = service
        self.known_error = known_error
        #: RPCs being answered now (reported to Serve's autoscaler by the replica)
        self.ongoing = 0

    async def _answer(
        self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        """``await call()``, with every refusal sent as a gRPC status and message."""
        self.ongoing += 1
        try:
            return await call()
        except ApiError as error:
            await context.abort(grpc_code(error.status), error.message)
        except AuthError as error:
            await context.abort(grpc_code(error.status_code), error.message)
        except Exception as error:
            known = self.known_error(error)
            if known is None:
                logger.exception("unhandled error in a gRPC call")
                known = ApiError(500, f"internal error: {type(error).__name__}")
            await context.abort(grpc_code(known.status), known.message)
        finally:
            self.ongoing -= 1

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller of the token in the ``authorization`` metadata, allowed to ``use``."""
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        authorization = metadata.get("authorization")
        token = bearer_token(authorization if isinstance(authorization, str) else None)
        return await self.service.validator.authenticate(token, "use")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.model_server is not None)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name=kserve_v2.SERVER_NAME, version=kserve_v2.SERVER_VERSION
        )

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def ready() -> Any:
            principal = await self.principal(context)
            ref = kserve_v2.model_ref(request.name, request.version or None)
            try:
                await self.service.describe(ref, principal)
            except ApiError as error:
                if error.status != 404:
                    raise
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer(context, ready)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def metadata() -> Any:
            principal = await self.principal(context)
            found = await kserve_v2.metadata_of(
                self.service, principal, request.name, request.version or None
            )
            return metadata_response(found)

        return await self._answer(context, metadata)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def infer() -> Any:
            principal = await self.principal(context)
            matrix = request_matrix(request)
            for output in request.outputs:
                kserve_v2.check_output(output.name)
            ref = kserve_v2.model_ref(request.model_name, request.model_version or None)
            name, version, out = await self.service.predict(ref, matrix, None, principal)
            return infer_response(request, name, version, out)

        return await self._answer(context, infer)


def ingress_autoscaling_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas of the ingress deployment for its HTTP requests plus its gRPC calls.

    Serve's default policy (ongoing requests over ``target_ongoing_requests``), counting
    the gRPC calls each replica reports (``record_autoscaling_stats``), which Serve does
    not see: they reach the replicas' own servers. Serve applies the bounds and delays.
    """
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    grpc_calls = sum(((ctx.aggregated_metrics or {}).get(ONGOING_METRIC) or {}).values())
    return (ctx.total_num_requests + grpc_calls) / ctx.config.get_target_ongoing_requests(), {}


#: Import path of :func:`ingress_autoscaling_policy` for Serve's autoscaling config.
INGRESS_AUTOSCALING_POLICY = f"{__name__}:ingress_autoscaling_policy"


def start_server(
    service: DataPlane, known_error: KnownError, host: str, port: int
) -> tuple[grpc.aio.Server, InferenceServicer]:
    """A ``grpc.aio`` server of :class:`InferenceServicer` bound to ``host:port``.

    Must be called on the event loop the server is to run on; start it with ``await
    server.start()``. Messages are bounded by the service's ``max_request_bytes``. Raises
    :class:`RuntimeError` naming the address when the port cannot be bound.
    """
    limit = service.settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),  # the node's ingress replicas share the port
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    servicer = InferenceServicer(service, known_error)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RuntimeError(f"KServe gRPC: cannot listen on {address}: {error}") from None
    if not bound:
        raise RuntimeError(f"KServe gRPC: cannot listen on {address} (grpc_port)")
    return server, servicer
