"""The TFaaS wire protocol: routes, JSON and protobuf bodies, upload forms.

Routes follow TFaaS (:mod:`~mlaas4hep.serve.apps.inference` lists them); every one calls
the protocol-agnostic :class:`~mlaas4hep.serve.dataplane.DataPlane`.
"""

import asyncio
import base64
import json
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile

from mlaas4hep.auth.oidc import Principal
from mlaas4hep.bundle import (
    BundleError,
    check_bundle_dir,
    extract_tarball,
    normalize_params,
    parse_params,
    to_matrix,
    write_params,
)
from mlaas4hep.serve.dataplane import DataPlane
from mlaas4hep.serve.errors import ApiError
from mlaas4hep.serve.protocols import tfaas_pb2


def rows_response(out: np.ndarray, single_row: bool) -> list[Any]:
    """TFaaS answer: one row -> its output vector; rows -> a float (or a list) per row."""
    if single_row:
        return out[0].tolist()
    if out.shape[1] == 1:
        return out[:, 0].tolist()
    return out.tolist()


def output_labels(labels: list[str], n_outputs: int) -> list[str]:
    """Label of each model output: one label an output, or for a single (sigmoid) output
    the last label (the positive class of ``background, signal``); else no labels."""
    if len(labels) == n_outputs:
        return labels
    if n_outputs == 1 and labels:
        return labels[-1:]
    return [""] * n_outputs


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None


def check_keys(keys: Any) -> list[str] | None:
    if keys is None:
        return None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ApiError(400, "'keys' must be a list of strings")
    return keys


def _form_text(form: Any, field: str) -> str | None:
    value = form.get(field)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise ApiError(400, f"upload form field {field!r} must be text, not a file")
    return str(value).strip()


async def _form_file(form: Any, field: str) -> tuple[str, bytes] | None:
    """``(file name, content)`` of a form field (a file or text), None when absent."""
    value = form.get(field)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        return posixpath.basename((value.filename or field).replace("\\", "/")), await value.read()
    return field, str(value).encode()


async def _required_file(form: Any, field: str, what: str = "upload form") -> tuple[str, bytes]:
    item = await _form_file(form, field)
    if item is None:
        raise ApiError(400, f"{what} lacks the {field!r} file")
    return item


def _safe_file_name(name: str, field: str) -> str:
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise ApiError(400, f"upload {field!r}: invalid file name {name!r}")
    return name


async def _form_bundle(request: Request, tmp: Path) -> tuple[Path, dict[str, Any], str | None]:
    """Write a multipart upload (name, params, model, labels[, specs, metadata]) to ``tmp``."""
    try:
        form = await request.form(max_files=8, max_fields=16)
    except Exception as error:
        raise ApiError(400, f"invalid multipart upload: {error}") from None
    name = _form_text(form, "name")
    if not name:
        raise ApiError(400, "upload form lacks the model 'name'")
    _, params_data = await _required_file(form, "params")
    raw = parse_params(params_data, "params")
    if raw["name"] != name:
        raise ApiError(
            400, f"params.json names model {raw['name']!r} but the upload 'name' is {name!r}"
        )
    model_name, model_data = await _required_file(form, "model")
    if request.headers.get("content-encoding", "").lower() == "base64":
        try:
            model_data = base64.b64decode(model_data, validate=True)
        except ValueError:
            raise ApiError(400, "upload 'model' is not valid base64") from None
    if not json.loads(params_data).get("model"):  # params name no file: keep the upload's name
        raw["model"] = _safe_file_name(model_name, "model")
    (tmp / raw["model"]).parent.mkdir(parents=True, exist_ok=True)
    (tmp / raw["model"]).write_bytes(model_data)
    labels = await _form_file(form, "labels")
    if labels is not None:
        (tmp / raw["labels"]).write_bytes(labels[1])
    for extra in ("specs", "metadata"):
        item = await _form_file(form, extra)
        if item is not None:
            (tmp / f"{extra}.json").write_bytes(item[1])
    write_params(tmp, raw)
    visibility = _form_text(form, "visibility") or None
    return tmp, check_bundle_dir(tmp, name), visibility


def build_router(service: "DataPlane") -> APIRouter:
    """The TFaaS routes of ``service`` (without the base path)."""
    router = APIRouter()
    User = Annotated[Principal, Depends(service.user)]
    limits = service.options.limits

    def model_ref(body: dict[str, Any], principal: Principal) -> str:
        ref = body.get("model") or service.default_model(principal)
        if not isinstance(ref, str):
            raise ApiError(400, "'model' must be a string")
        return ref

    async def predict_json(request: Request, principal: User) -> Any:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object with 'keys', 'values', 'model'")
        matrix = to_matrix(body.get("values"))
        ref = model_ref(body, principal)
        _, _, out = await service.predict(ref, matrix, check_keys(body.get("keys")), principal)
        single = not isinstance(body["values"][0], list)
        return JSONResponse(rows_response(out, single))

    async def predict_events(request: Request, principal: User) -> Any:
        body = await json_body(request)
        if not isinstance(body, dict) or "events" not in body:
            raise ApiError(400, "request body must be a JSON object with 'events' and 'model'")
        ref = model_ref(body, principal)
        _, _, out = await service.predict_events(ref, body["events"], principal)
        return JSONResponse(rows_response(out, single_row=False))

    async def predict_proto(request: Request, principal: User) -> Response:
        raw = await request.body()
        try:
            row = tfaas_pb2.Row.FromString(raw)
        except Exception:
            raise ApiError(400, "request body is not a protobuf tfaaspb.Row") from None
        if not row.value:
            raise ApiError(400, "tfaaspb.Row has no values")
        matrix = np.asarray([list(row.value)], dtype=np.float32)
        matrix = np.nan_to_num(matrix, nan=0.0)
        ref = row.model or service.default_model(principal)
        _, _, out = await service.predict(ref, matrix, list(row.key) or None, principal)
        labels = (await service.describe(ref, principal))["labels"]
        names = output_labels(labels, out.shape[1])
        answer = tfaas_pb2.Predictions(
            prediction=[
                tfaas_pb2.Class(label=label, probability=float(p))
                for label, p in zip(names, out[0], strict=True)
            ]
        )
        return Response(answer.SerializeToString(), media_type="application/octet-stream")

    async def predict_image(request: Request, principal: User) -> Any:
        try:
            form = await request.form(max_files=2, max_fields=4)
        except Exception as error:
            raise ApiError(400, f"invalid multipart image request: {error}") from None
        _, image = await _required_file(form, "image", "image request")
        ref = _form_text(form, "model") or service.default_model(principal)
        _, _, out = await service.predict_image(ref, image, principal)
        return JSONResponse(rows_response(out, single_row=True))

    for path in ("/json", "/predict/json"):
        router.add_api_route(path, predict_json, methods=["POST"])
    for path in ("/events", "/predict/events"):
        router.add_api_route(path, predict_events, methods=["POST"])
    for path in ("/proto", "/predict/proto"):
        router.add_api_route(path, predict_proto, methods=["POST"])
    for path in ("/image", "/predict/image"):
        router.add_api_route(path, predict_image, methods=["POST"])

    async def upload(request: Request, principal: User) -> Any:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_bytes:
            raise ApiError(413, f"upload of {size} bytes is over the limit of {limits.max_bytes}")
        with tempfile.TemporaryDirectory(prefix="mlaas4hep-upload-") as tmp:
            ctype = request.headers.get("content-type", "").lower()
            if "multipart/form-data" in ctype:
                bundle, params, visibility = await _form_bundle(request, Path(tmp))
            else:
                body = await request.body()
                if len(body) > limits.max_bytes:
                    raise ApiError(413, f"upload is over the limit of {limits.max_bytes} bytes")
                bundle = await asyncio.to_thread(extract_tarball, body, Path(tmp), limits)
                name = request.query_params.get("name")
                params = check_bundle_dir(bundle, name)
                visibility = request.query_params.get("visibility") or None
            return await service.publish(bundle, params, principal, visibility)

    router.add_api_route("/upload", upload, methods=["POST"])
    router.add_api_route("/bundle", upload, methods=["POST"])

    @router.get("/models")
    @router.get("/models/")  # as TFaaS's docs call it; a redirect would lose the base path
    async def models(principal: User) -> Any:
        return await service.list_models(principal)

    @router.get("/params")
    async def default_params(principal: User) -> Any:
        return await service.params_of(service.default_model(principal), principal)

    @router.get("/params/{model:path}")
    async def params(model: str, principal: User) -> Any:
        return await service.params_of(model, principal)

    @router.post("/params")
    async def set_params(request: Request, principal: User) -> Any:
        try:
            params = normalize_params(await json_body(request), "params")
        except BundleError as error:
            raise ApiError(400, str(error)) from None
        if not params["name"]:
            raise ApiError(400, "params: 'name' names the default model and is required")
        await service.resolve(params["name"], principal)
        await asyncio.to_thread(
            service.storage.write_json, params, "uploads", principal.owner, "tfaas", "params.json"
        )
        return params

    async def delete(request: Request, principal: User) -> Any:
        ref = request.query_params.get("model")
        if not ref and "form" in request.headers.get("content-type", ""):
            ref = _form_text(await request.form(), "model")
        if not ref:
            raise ApiError(400, "delete needs the 'model' form or query field")
        return await service.delete(ref, principal)

    router.add_api_route("/delete", delete, methods=["DELETE"])

    @router.delete("/delete/{model:path}")
    async def delete_path(model: str, principal: User) -> Any:
        return await service.delete(model, principal)

    @router.get("/status")
    async def status() -> Any:
        memory = psutil.virtual_memory()
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = None
        return {
            "status": "ok",
            "uptime": time.time() - service.started,
            "replica": replica,
            "getRequests": service.counts["GET"],
            "postRequests": service.counts["POST"],
            "deleteRequests": service.counts["DELETE"],
            "Memory": {"Total": memory.total, "Used": memory.used, "UsedPercent": memory.percent},
            "Load": list(os.getloadavg()),
        }

    return router
