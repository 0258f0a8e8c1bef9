"""TFaaS-compatible inference service on Ray Serve (plus KServe v2 routes).

Two deployments: :class:`TFaaSIngress` (FastAPI, token-gated routes, model lookup in
storage, cached under the registry's stamp) and
:class:`~mlaas4hep.serve.model_server.ModelServer` (bundles loaded lazily per replica by
``@serve.multiplexed``, dynamic batching by ``@serve.batch``, autoscaled).

Where a prediction runs is chosen per request: a ``/json``, ``/proto`` or ``/events``
request (and a KServe v2 ``infer``) of at most ``direct_max_rows`` rows is predicted in
the ingress replica itself, with the bundle kept in the ingress's own LRU cache (one
process, no second hop: a few milliseconds less per request), where concurrent requests
of a model with an expensive call (a TensorFlow graph) share one model call
(:mod:`~mlaas4hep.serve.microbatch`); larger requests and images
go to the model deployment, which batches them across requests and scales on its own.
Both paths see an upload or a delete with the next request. Routes follow TFaaS::

    POST /json, /predict/json     {"keys": [...], "values": [...] | [[...], ...], "model": "m"}
    POST /events, /predict/events {"events": {branch: value(s)} | [...], "model": "m"}: raw
                                  physics events, flattened with the bundle's specs.json
    POST /proto, /predict/proto   tfaaspb.Row -> tfaaspb.Predictions
    POST /image, /predict/image   multipart ``image`` file + ``model``: the image decoded,
                                  resized to the model's input and scaled to [0, 1]
    POST /upload, /bundle         multipart name/params/model/labels, or a gzip tarball body
    GET  /models, /params/{model}, /params;  POST /params (the caller's default model)
    DELETE /delete (form or query field ``model``), /delete/{model}
    GET  /status                  no token needed

The ingress replicas also serve KServe v2 over gRPC on the ``grpc_port`` setting
(:mod:`mlaas4hep.serve.kserve_grpc`). A model is named ``"name"`` (latest version) or
``"name/versions/N"``. Run with::

    serve run mlaas4hep.serve.tfaas:build_tfaas_app
"""

import asyncio
import base64
import datetime as dt
import json
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from mlaas4hep.platform.auth import Principal, TokenValidator
from mlaas4hep.platform.quota import Quota, QuotaExceeded
from mlaas4hep.platform.registry import (
    ModelNameTaken,
    ModelNotFound,
    ModelRecord,
    ModelRegistry,
    RegistryError,
)
from mlaas4hep.platform.settings import Settings, load_settings
from mlaas4hep.platform.storage import Storage
from mlaas4hep.serve import kserve, kserve_grpc, tfaas_pb2
from mlaas4hep.serve.body_limit import install_body_limit
from mlaas4hep.serve.bundle import (
    BundleError,
    InputError,
    LoadedModel,
    UploadLimits,
    check_bundle_dir,
    described_params,
    extract_tarball,
    import_keras,
    normalize_params,
    parse_params,
    read_tree,
    to_matrix,
    write_params,
)
from mlaas4hep.serve.errors import ApiError, install_error_handlers
from mlaas4hep.serve.model_cache import Lookup, LookupCache, ModelCache
from mlaas4hep.serve.model_server import ModelMetrics, ModelServer
from mlaas4hep.serve.security import principal_dependency

ENV_PREFIX = "MLAAS4HEP_TFAAS_"
#: Serve's setting of an ingress replica with ``ingress_on_replica_loop``.
INGRESS_ON_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
_VERSION_REF = re.compile(r"^(?P<name>[^/@]+)(?:/versions/(?P<version>[^/]+))?$")


class TFaaSOptions(BaseModel):
    """Options of the inference service; each has an ``MLAAS4HEP_TFAAS_<NAME>`` variable."""

    base_path: str = Field(default="", description="Prefix of every route, e.g. /tfaas")
    max_upload_bytes: int = Field(default=512 * 1024**2, gt=0)
    max_member_bytes: int = Field(default=512 * 1024**2, gt=0)
    ingress_min_replicas: int = Field(
        default=2,
        ge=1,
        description="Ingress replicas from the start: each is one Python process (one core "
        "at most), and Serve adds one only after upscale_delay_s of load",
    )
    ingress_max_replicas: int = Field(default=2, ge=1)
    model_min_replicas: int = Field(default=1, ge=1)
    model_max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0, description="Serve autoscaling")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="Serve autoscaling")
    look_back_period_s: float = Field(default=30.0, gt=0, description="Serve autoscaling")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="Serve autoscaling")
    ingress_cpus: float = Field(default=0.1, gt=0)
    model_cpus: float = Field(default=0.25, gt=0)
    access_log: bool = Field(
        default=False,
        description="Log every request of the replicas (a log record per prediction costs "
        "about a tenth of a small request's time; Serve's metrics count requests anyway)",
    )
    direct_max_rows: int = Field(
        default=32,
        ge=0,
        description="Predict requests of at most this many rows in the ingress replica "
        "(0: every prediction goes to the model deployment)",
    )
    batch_above_us: float = Field(
        default=100.0,
        ge=0,
        description="Merge concurrent requests predicted in the ingress into one model call "
        "for models whose single call takes at least this many microseconds (TensorFlow "
        "graphs; a numpy Dense stack is cheaper than the merge); 0 merges for every model",
    )
    batch_max_rows: int = Field(
        default=256, ge=1, description="Most rows of one merged model call in the ingress"
    )
    ingress_tf_threads: int = Field(
        default=1,
        ge=0,
        description="TensorFlow inter- and intra-op threads of an ingress replica, whose "
        "model calls are small (0: TensorFlow's default, one per core)",
    )
    ingress_on_replica_loop: bool = Field(
        default=True,
        description="Run the ingress's handlers on the replica's own event loop instead of "
        "Serve's separate user-code thread, where every request crosses two threads that "
        "take turns on the GIL; the ingress handlers do not block (model calls run in "
        "worker threads)",
    )

    @classmethod
    def from_env(cls, **overrides: Any) -> "TFaaSOptions":
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    @property
    def prefix(self) -> str:
        path = self.base_path.strip().strip("/")
        return f"/{path}" if path else ""

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits(max_bytes=self.max_upload_bytes, max_member_bytes=self.max_member_bytes)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def remote_cause(error: BaseException) -> BaseException:
    """The exception a deployment raised, unwrapped from Ray's task error."""
    return getattr(error, "cause", None) or error


def api_error_of(error: BaseException) -> ApiError | None:
    """The client-facing answer to a known error of storage, bundles or inputs."""
    cause = remote_cause(error)
    if isinstance(cause, ModelNotFound):
        return ApiError(404, str(cause))
    if isinstance(cause, ModelNameTaken):
        return ApiError(409, str(cause))
    if isinstance(cause, InputError | BundleError | RegistryError):
        return ApiError(400, str(cause))
    return None


class TFaaSService:
    """Model lookup, access control and prediction shared by the TFaaS and KServe routes."""

    def __init__(
        self,
        settings: Settings,
        options: TFaaSOptions,
        model_server: DeploymentHandle | None,
        validator: TokenValidator | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.registry = ModelRegistry(Storage(settings.storage))
        self.lookups = LookupCache(self.registry)
        #: bundles predicted in this replica (requests of at most ``direct_max_rows`` rows)
        self.models = ModelCache(
            self.registry,
            batch_max_rows=options.batch_max_rows,
            batch_above_s=options.batch_above_us * 1e-6,
        )
        self.metrics: ModelMetrics | None = None  # created on first use (needs Ray)
        self.model_server = model_server
        self.validator = validator or TokenValidator.from_settings(settings)
        self.user = principal_dependency(self.validator, "use")
        self.started = time.time()
        self.counts = {"GET": 0, "POST": 0, "DELETE": 0}

    @property
    def storage(self) -> Storage:
        return self.registry.storage

    # -- lookup ---------------------------------------------------------------

    @staticmethod
    def parse_ref(ref: str) -> tuple[str, int | None]:
        """``(name, version)`` of ``"name"`` or ``"name/versions/N"``."""
        match = _VERSION_REF.match(ref.strip()) if isinstance(ref, str) else None
        if match is None:
            raise ApiError(400, f"invalid model {ref!r}: use 'name' or 'name/versions/N'")
        version = match["version"]
        if version is not None and not version.isdigit():
            raise ApiError(400, f"invalid model version {version!r} in {ref!r}")
        return match["name"], None if version is None else int(version)

    @staticmethod
    def may_use(record: ModelRecord, principal: Principal) -> bool:
        if principal.is_admin or record.owner == principal.owner:
            return True
        if record.visibility == "public":
            return True
        return record.visibility == "group" and principal.in_groups(record.groups)

    @classmethod
    def check_access(cls, record: ModelRecord, principal: Principal, write: bool = False) -> None:
        """ApiError unless ``principal`` may use ``record`` (own it, when ``write``).

        A model the caller may not see answers 404 like a missing one, so other tenants'
        private models do not leak; a visible model the caller does not own answers 403
        to a write.
        """
        if not cls.may_use(record, principal):
            raise ApiError(404, f"model {record.name!r} not found")
        if write and not (principal.is_admin or record.owner == principal.owner):
            raise ApiError(403, f"model {record.name!r} belongs to another user")

    def _record(self, name: str) -> ModelRecord:
        try:
            return self.registry.record(name)
        except RegistryError as error:
            raise api_error_of(error) or ApiError(404, str(error)) from None

    async def record(self, name: str, principal: Principal, write: bool = False) -> ModelRecord:
        """The record of ``name`` if ``principal`` may use it (own it, when ``write``)."""
        record = await asyncio.to_thread(self._record, name)
        self.check_access(record, principal, write)
        return record

    async def resolve(self, ref: str, principal: Principal) -> Lookup:
        """Record, version and model id of a model reference the caller may use.

        One small read of the registry's stamp, the rest from this replica's cache; on a
        local filesystem that read is cheaper than a hop to a thread.
        """
        name, version = self.parse_ref(ref)
        try:
            if self.storage.is_local:
                found = self.lookups.lookup(name, version)
            else:
                found = await asyncio.to_thread(self.lookups.lookup, name, version)
        except RegistryError as error:
            raise api_error_of(error) or ApiError(404, str(error)) from None
        self.check_access(found.record, principal)
        return found

    def default_model(self, principal: Principal) -> str:
        """The model set with ``POST /params`` by the caller."""
        try:
            params = self.storage.read_json("uploads", principal.owner, "tfaas", "params.json")
        except FileNotFoundError:
            raise ApiError(
                400, "no 'model' given and no default model set (POST /params)"
            ) from None
        return params["name"]

    # -- model server calls ---------------------------------------------------

    async def call(self, model_id: str | None, method: str, *args: Any) -> Any:
        """``method(*args)`` on a model server replica, for model ``model_id`` if given."""
        if self.model_server is None:
            raise ApiError(503, "no model server is configured")
        handle = self.model_server
        if model_id is not None:
            handle = handle.options(multiplexed_model_id=model_id)
        try:
            return await getattr(handle, method).remote(*args)
        except Exception as error:
            known = api_error_of(error)
            if known is None:
                raise
            raise known from None

    def predicts_here(self, rows: int) -> bool:
        """Whether a request of ``rows`` rows is predicted in this (ingress) replica."""
        return rows <= self.options.direct_max_rows

    async def local_model(self, model_id: str) -> LoadedModel:
        """The bundle of ``model_id`` from this replica's cache (loaded on first use)."""
        try:
            return await self.models.get(model_id)
        except (RegistryError, BundleError) as error:
            raise api_error_of(error) or ApiError(400, str(error)) from None

    async def predict_here(
        self, found: Lookup, inputs: Callable[[LoadedModel], np.ndarray]
    ) -> np.ndarray:
        """Predict ``inputs(model)`` in this replica, with the model deployment's metrics;
        concurrent requests of an expensive model share one model call (``MicroBatcher``)."""
        if self.metrics is None:
            self.metrics = ModelMetrics()
        with self.metrics.request(found.record.name, found.version):
            model = await self.local_model(found.model_id)
            matrix = inputs(model)
            self.metrics.model_call(model, len(matrix))
            return await self.models.batcher(found.model_id).predict(matrix)

    async def _predicted(
        self,
        ref: str,
        principal: Principal,
        rows: int,
        inputs: Callable[[LoadedModel], np.ndarray],
        method: str,
        *args: Any,
    ) -> tuple[str, int, np.ndarray]:
        """``(name, version, outputs)`` of a request of ``rows`` rows: ``inputs(model)``
        predicted here when it is small, else ``method(*args)`` on the model deployment."""
        found = await self.resolve(ref, principal)
        if self.predicts_here(rows):
            out = await self.predict_here(found, inputs)
        else:
            out = await self.call(found.model_id, method, *args)
        return found.record.name, found.version, out

    async def predict(
        self, ref: str, matrix: np.ndarray, keys: list[str] | None, principal: Principal
    ) -> tuple[str, int, np.ndarray]:
        def inputs(model: LoadedModel) -> np.ndarray:
            return model.reorder(matrix, keys)

        return await self._predicted(ref, principal, len(matrix), inputs, "predict", matrix, keys)

    async def predict_events(
        self, ref: str, events: Any, principal: Principal
    ) -> tuple[str, int, np.ndarray]:
        def inputs(model: LoadedModel) -> np.ndarray:
            return model.events_matrix(events)

        rows = len(events) if isinstance(events, list) else 1
        return await self._predicted(ref, principal, rows, inputs, "predict_events", events)

    async def predict_image(
        self, ref: str, image: bytes, principal: Principal
    ) -> tuple[str, int, np.ndarray]:
        found = await self.resolve(ref, principal)
        return (
            found.record.name,
            found.version,
            await self.call(found.model_id, "predict_image", image),
        )

    async def describe(self, ref: str, principal: Principal) -> dict[str, Any]:
        found = await self.resolve(ref, principal)
        if found.model_id in self.models:  # predicted here already: no second hop
            return (await self.local_model(found.model_id)).describe()
        return await self.call(found.model_id, "describe")

    # -- registry changes -----------------------------------------------------

    async def publish(
        self, bundle: Path, params: dict[str, Any], principal: Principal, visibility: str | None
    ) -> dict[str, Any]:
        """Check that the bundle loads, then register it as the next version (``visibility``
        ``None`` keeps the model's, private for a new one)."""
        name = params["name"]
        if visibility not in (None, "private", "group", "public"):
            raise ApiError(400, f"visibility {visibility!r}: use private, group or public")
        if not params.get("timestamp"):
            params["timestamp"] = _now()
        write_params(bundle, params)
        metadata = bundle / "metadata.json"
        if not metadata.is_file():
            metadata.write_text(json.dumps({"owner": principal.owner, "uploaded": _now()}))
        holder = await asyncio.to_thread(self.registry.owner, name)  # registered or reserved
        if holder not in (None, principal.owner):
            # refuse before loading the bundle; register() checks again when it writes
            raise ApiError(409, f"model name {name!r} belongs to another user")
        files = await asyncio.to_thread(read_tree, bundle)
        # The new version counts in its owner's quota: its room is held from before the
        # check until it is registered, so concurrent uploads cannot pass the quota.
        held = Quota(self.storage, principal.owner, self.settings.user_quota_bytes).reservation()
        size = sum(len(data) for data in files.values())
        try:
            await asyncio.to_thread(held.take, size, size)
        except QuotaExceeded as error:
            raise ApiError(413, f"model {name!r}: {error}") from None
        try:
            info = await self.call(None, "check_bundle", files, name)
            write_params(bundle, described_params(params, info))  # format, tensors for /params
            entry = await asyncio.to_thread(
                self.registry.register,
                name,
                bundle,
                principal.owner,
                visibility,  # type: ignore[arg-type]
                list(principal.groups) if visibility == "group" else None,
            )
        except RegistryError as error:
            raise api_error_of(error) or ApiError(400, str(error)) from None
        finally:
            await asyncio.to_thread(held.release)
        record = await asyncio.to_thread(self.registry.record, name)
        return {"name": name, "version": entry.version, "visibility": record.visibility}

    async def delete(self, ref: str, principal: Principal) -> dict[str, Any]:
        name, version = self.parse_ref(ref)
        await self.record(name, principal, write=True)
        try:
            await asyncio.to_thread(self.registry.delete, name, version)
        except RegistryError as error:
            raise api_error_of(error) or ApiError(404, str(error)) from None
        return {"deleted": name, "version": version}

    async def params_of(self, ref: str, principal: Principal) -> dict[str, Any]:
        found = await self.resolve(ref, principal)
        params = await asyncio.to_thread(
            self.storage.read_json, "models", found.record.name, str(found.version), "params.json"
        )
        return normalize_params(params)

    async def list_models(self, principal: Principal) -> list[dict[str, Any]]:
        records = await asyncio.to_thread(self.registry.list_records)
        out = []
        for record in records:
            if not self.may_use(record, principal):
                continue
            try:
                params = await asyncio.to_thread(
                    self.storage.read_json, "models", record.name, str(record.latest), "params.json"
                )
                params = normalize_params(params)
            except (FileNotFoundError, ValueError):
                continue  # deleted or replaced while listing
            params.update(
                name=record.name,
                version=record.latest,
                versions=record.versions,
                owner=record.owner,
                visibility=record.visibility,
            )
            out.append(params)
        return out


# --------------------------------------------------------------------------- routes


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


def build_router(service: "TFaaSService") -> APIRouter:
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


class RequestCounter:
    """ASGI middleware counting HTTP requests by method into ``counts`` (for ``/status``);
    plain ASGI, not ``@app.middleware``, which costs a task and streams per request."""

    def __init__(self, app: ASGIApp, counts: dict[str, int]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.counts:
            self.counts[scope["method"]] += 1
        await self.app(scope, receive, send)


def create_app(service: TFaaSService) -> FastAPI:
    """The FastAPI app of the TFaaS and KServe v2 routes, under the optional base path."""
    app = FastAPI(title="mlaas4hep inference (TFaaS + KServe v2)")
    install_error_handlers(app)

    @app.exception_handler(InputError)
    @app.exception_handler(BundleError)
    async def _bad_input(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    app.add_middleware(RequestCounter, counts=service.counts)
    prefix = service.options.prefix
    # Uploads up to the service's and the platform's upload limits; predictions (TFaaS
    # and KServe) and every other body up to the platform's request limit.
    install_body_limit(
        app,
        service.settings.max_request_bytes,
        min(service.options.max_upload_bytes, service.settings.max_upload_bytes),
        [f"POST {re.escape(prefix)}/(upload|bundle)"],
    )
    app.include_router(build_router(service), prefix=prefix)
    app.include_router(kserve.build_router(service), prefix=prefix)
    return app


# --------------------------------------------------------------------------- Serve


def _limit_tf_threads(threads: int) -> None:
    """Give TensorFlow ``threads`` inter- and intra-op threads in this process (0: its
    default, one per core), before it runs its first op. The ingress calls models on at
    most ``batch_max_rows`` rows: more threads do not speed such a call up, and their
    spinning takes the cores from HAProxy and the other replicas."""
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow ran an op in this process already: keep its pools
        pass


@serve.ingress()
class TFaaSIngress:
    """Ingress deployment: builds the FastAPI app on the replica.

    When it predicts small requests itself it imports TensorFlow while it starts: Serve
    freezes the objects that exist when a replica is ready out of the garbage collector's
    scans, and TensorFlow's are most of them (a full collection would otherwise stall
    requests for tens of milliseconds).
    """

    async def __init__(
        self, settings: Settings, options: TFaaSOptions, model_server: DeploymentHandle
    ) -> None:
        if options.direct_max_rows > 0:
            import_keras()
            _limit_tf_threads(options.ingress_tf_threads)
        self.service = TFaaSService(settings, options, model_server)
        self.grpc: tuple[Any, kserve_grpc.InferenceServicer] | None = None
        if settings.grpc_port:  # KServe v2 over gRPC, beside the HTTP routes
            host = settings.grpc_host or settings.host
            self.grpc = kserve_grpc.start_server(
                self.service, api_error_of, host, settings.grpc_port
            )
            await self.grpc[0].start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """gRPC calls being answered, for :func:`~mlaas4hep.serve.kserve_grpc.
        ingress_autoscaling_policy` (Serve counts only its own HTTP requests)."""
        return {kserve_grpc.ONGOING_METRIC: float(self.grpc[1].ongoing if self.grpc else 0)}

    async def __del__(self) -> None:
        if self.grpc is not None:
            await self.grpc[0].stop(grace=5.0)


def _deployment(cls: type, role: str, options: TFaaSOptions) -> Any:
    """A Serve deployment of ``cls`` with the CPUs and replica range of ``role``
    (``ingress`` or ``model``) in ``options``, autoscaled by ongoing requests."""
    low = getattr(options, f"{role}_min_replicas")
    # The ingress also counts the gRPC calls its replicas answer (kserve_grpc).
    policy = (
        {"policy_function": kserve_grpc.INGRESS_AUTOSCALING_POLICY} if role == "ingress" else {}
    )
    actor_options: dict[str, Any] = {"num_cpus": getattr(options, f"{role}_cpus")}
    if role == "ingress" and options.ingress_on_replica_loop:
        # Read by Serve when the replica's process starts; merged with the app's env_vars.
        actor_options["runtime_env"] = {"env_vars": INGRESS_ON_LOOP_ENV}
    return serve.deployment(
        cls,
        name=cls.__name__,
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": options.access_log},
        max_ongoing_requests=128,  # >= the model server's batch size
        autoscaling_config={
            "min_replicas": low,
            "initial_replicas": low,
            "max_replicas": max(low, getattr(options, f"{role}_max_replicas")),
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "look_back_period_s": options.look_back_period_s,
            "metrics_interval_s": options.metrics_interval_s,
            **({"policy": policy} if policy else {}),
        },
    )


def tfaas_application(
    settings: Settings | None = None, options: TFaaSOptions | None = None
) -> serve.Application:
    """The TFaaS Serve application for ``settings`` and ``options``."""
    settings = settings or load_settings()
    options = options or TFaaSOptions.from_env()
    model = _deployment(ModelServer, "model", options).bind(settings.storage)
    return _deployment(TFaaSIngress, "ingress", options).bind(settings, options, model)


def build_tfaas_app(settings: Settings | dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (``mlaas4hep.serve.tfaas:build_tfaas_app``, route prefix /).

    Takes :class:`Settings`, or the argument dict of ``serve run``/a Serve config whose
    keys are settings or :class:`TFaaSOptions` fields.
    """
    if isinstance(settings, Settings):
        return tfaas_application(settings)
    args = dict(settings or {})
    option_args = {k: args.pop(k) for k in list(args) if k in TFaaSOptions.model_fields}
    return tfaas_application(load_settings(**args), TFaaSOptions.from_env(**option_args))
