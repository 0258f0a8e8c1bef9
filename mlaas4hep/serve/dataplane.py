"""The protocol-agnostic data plane of inference: model lookup, access and prediction.

:class:`DataPlane` answers every inference protocol (TFaaS routes in
:mod:`~mlaas4hep.serve.protocols.tfaas`, KServe v2 REST in
:mod:`~mlaas4hep.serve.protocols.kserve_v2`, KServe v2 gRPC in
:mod:`~mlaas4hep.serve.protocols.kserve_grpc`): it resolves ``"name"`` or
``"name/versions/N"`` to a registered bundle the caller may use, predicts in this process
(small requests, the ingress's own LRU cache) or on the model deployment
(:class:`~mlaas4hep.serve.runtime.model_server.ModelServer`), and stores uploads.
:class:`TFaaSOptions` are the service's options (``MLAAS4HEP_TFAAS_<NAME>`` variables).
"""

import asyncio
import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from ray.serve.handle import DeploymentHandle

from mlaas4hep.auth.oidc import Principal, TokenValidator
from mlaas4hep.bundle import (
    BundleError,
    InputError,
    LoadedModel,
    UploadLimits,
    described_params,
    normalize_params,
    read_tree,
    write_params,
)
from mlaas4hep.serve.errors import ApiError
from mlaas4hep.serve.runtime.model_cache import Lookup, LookupCache, ModelCache
from mlaas4hep.serve.runtime.model_server import ModelMetrics
from mlaas4hep.serve.security import principal_dependency
from mlaas4hep.settings import Settings
from mlaas4hep.store.quota import Quota, QuotaExceeded
from mlaas4hep.store.registry import (
    ModelNameTaken,
    ModelNotFound,
    ModelRecord,
    ModelRegistry,
    RegistryError,
)
from mlaas4hep.store.storage import Storage

ENV_PREFIX = "MLAAS4HEP_TFAAS_"
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


class DataPlane:
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
