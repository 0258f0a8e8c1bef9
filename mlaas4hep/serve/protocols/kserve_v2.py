"""KServe v2 / Open Inference Protocol routes beside the TFaaS ones.

::

    GET  /v2/health/live, /v2/health/ready, /v2         (no token needed)
    GET  /v2/models/{m}[/versions/{v}]                  model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready
    POST /v2/models/{m}[/versions/{v}]/infer            one input [rows, features]

Tensors are sent as JSON ``data`` or, with the binary tensor data extension (what
``tritonclient`` uses by default), as raw little-endian bytes after a JSON header whose
length is in the ``Inference-Header-Content-Length`` header.
"""

import json
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from mlaas4hep.auth.oidc import Principal
from mlaas4hep.serve.errors import ApiError

if TYPE_CHECKING:
    from mlaas4hep.serve.dataplane import DataPlane

SERVER_NAME = "mlaas4hep"
SERVER_VERSION = "0.1.0"
HEADER_LENGTH = "inference-header-content-length"
INPUT_NAME = "input"
OUTPUT_NAME = "output"

#: Open Inference Protocol datatypes that convert to the float32 model input.
DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def model_ref(model: str, version: str | None) -> str:
    """The model reference ``name`` or ``name/versions/N`` of a protocol's name and version."""
    return model if version is None else f"{model}/versions/{version}"


def split_body(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of a request and its binary tail."""
    size = len(raw)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise ApiError(400, f"invalid Inference-Header-Content-Length {header_length!r}")
        size = int(header_length)
    try:
        body = json.loads(raw[:size])
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"inference request is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "inference request must be a JSON object")
    return body, raw[size:]


def input_matrix(body: dict[str, Any], binary: bytes) -> np.ndarray:
    """The float32 ``[rows, features]`` matrix of the request's single input tensor."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "'inputs' must be a list of one tensor (the [rows, features] input)")
    tensor = inputs[0]
    name = tensor.get("name", INPUT_NAME)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise ApiError(
            400, f"input {name!r}: binary_data_size {size!r} != {len(binary)} bytes sent"
        )
    data = tensor.get("data")
    if size is None and data is None:
        raise ApiError(400, f"input {name!r} has no 'data'")
    raw = binary if size is not None else None
    return tensor_matrix(name, tensor.get("datatype"), tensor.get("shape"), raw=raw, data=data)


def tensor_matrix(
    name: str, datatype: Any, shape: Any, raw: bytes | None = None, data: Any = None
) -> np.ndarray:
    """The float32 ``[rows, features]`` matrix of one input tensor, for every protocol.

    ``datatype`` and ``shape`` as the request gave them; the values either as ``raw``
    little-endian bytes (binary extension, gRPC ``raw_input_contents``) or as ``data``
    (a nested or flat list: JSON ``data``, gRPC typed ``contents``). Raises
    :class:`ApiError` (400) naming the input and the rule it breaks.
    """
    if datatype not in DATATYPES:
        raise ApiError(
            400, f"input {name!r}: datatype {datatype!r} not supported; use {', '.join(DATATYPES)}"
        )
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise ApiError(400, f"input {name!r}: 'shape' must be [features] or [rows, features]")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    try:
        array = np.frombuffer(raw, dtype=dtype) if raw is not None else np.asarray(data, dtype)
        matrix = array.reshape(shape).astype(np.float32)
    except (ValueError, TypeError) as error:
        raise ApiError(
            400, f"input {name!r}: data does not fit {datatype} {shape}: {error}"
        ) from None
    if matrix.ndim == 1:
        matrix = matrix[np.newaxis, :]
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ApiError(400, f"input {name!r} is empty")
    return np.nan_to_num(matrix, nan=0.0)


def check_output(name: Any) -> None:
    """ApiError (400) unless ``name`` is the name of the model's output tensor."""
    if name != OUTPUT_NAME:
        raise ApiError(400, f"unknown output {name!r}; the model has {OUTPUT_NAME!r}")


def wants_binary(body: dict[str, Any]) -> bool:
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list):
        raise ApiError(400, "'outputs' must be a list")
    for item in outputs:
        check_output(item.get("name") if isinstance(item, dict) else None)
        if (item.get("parameters") or {}).get("binary_data"):
            return True
    return bool((body.get("parameters") or {}).get("binary_data_output"))


def infer_response(body: dict[str, Any], name: str, version: int, out: np.ndarray) -> Response:
    tensor: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(out.shape)}
    answer: dict[str, Any] = {"model_name": name, "model_version": str(version)}
    if "id" in body:
        answer["id"] = body["id"]
    answer["outputs"] = [tensor]
    if not wants_binary(body):
        tensor["data"] = out.reshape(-1).tolist()
        return JSONResponse(answer)
    data = out.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(answer).encode()
    return Response(
        header + data,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def model_metadata(info: dict[str, Any], versions: list[int]) -> dict[str, Any]:
    """The model metadata of a model described by ``info``
    (:meth:`~mlaas4hep.bundle.LoadedModel.describe`) with ``versions``.

    The protocol's tensors are always ``input`` ``[-1, features]`` and ``output``
    ``[-1, outputs]`` (one client works with every format); ``platform`` names the
    model's format, and ``parameters`` its format and its own tensor names and shapes."""
    model_input, model_output = info["inputs"][0], info["outputs"][0]
    return {
        "name": info["name"],
        "versions": [str(v) for v in versions],
        "platform": info["platform"],
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, info["n_features"]]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, info["n_outputs"]]}],
        "parameters": {
            "format": info["format"],
            "model_input": model_input["name"],
            "model_input_shape": model_input["shape"],
            "model_output": model_output["name"],
            "model_output_shape": model_output["shape"],
        },
    }


async def metadata_of(
    service: "DataPlane", principal: Principal, model: str, version: str | None = None
) -> dict[str, Any]:
    """The model metadata of ``model`` (``version``: that one, else every version the
    caller may see), for the REST and gRPC protocols alike."""
    info = await service.describe(model_ref(model, version), principal)
    versions = (
        [info["version"]]
        if version is not None
        else (await service.record(model, principal)).versions
    )
    return model_metadata(info, versions)


def build_router(service: "DataPlane") -> APIRouter:
    """The KServe v2 routes of ``service``."""
    router = APIRouter(prefix="/v2")
    User = Annotated[Principal, Depends(service.user)]

    @router.get("/health/live")
    async def live() -> Any:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> Any:
        return {"ready": service.model_server is not None}

    @router.get("")
    async def server_metadata() -> Any:
        return {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"],
        }

    async def metadata(principal: User, model: str, version: str | None = None) -> Any:
        return await metadata_of(service, principal, model, version)

    async def model_ready(principal: User, model: str, version: str | None = None) -> Any:
        info = await service.describe(model_ref(model, version), principal)
        return {"name": info["name"], "version": str(info["version"]), "ready": True}

    async def infer(
        request: Request, principal: User, model: str, version: str | None = None
    ) -> Response:
        body, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        matrix = input_matrix(body, binary)
        wants_binary(body)  # check the requested outputs before predicting
        ref = model_ref(model, version)
        name, number, out = await service.predict(ref, matrix, None, principal)
        return infer_response(body, name, number, out)

    for base in ("/models/{model}", "/models/{model}/versions/{version}"):
        router.add_api_route(base, metadata, methods=["GET"])
        router.add_api_route(base + "/ready", model_ready, methods=["GET"])
        router.add_api_route(base + "/infer", infer, methods=["POST"])
    return router
