"""TFaaS-compatible inference service on Ray Serve (plus KServe v2 routes).

Two deployments: :class:`TFaaSIngress` (FastAPI, token-gated routes, model lookup in
storage, cached under the registry's stamp) and
:class:`~mlaas4hep.serve.runtime.model_server.ModelServer` (bundles loaded lazily per replica by
``@serve.multiplexed``, dynamic batching by ``@serve.batch``, autoscaled).

Where a prediction runs is chosen per request: a ``/json``, ``/proto`` or ``/events``
request (and a KServe v2 ``infer``) of at most ``direct_max_rows`` rows is predicted in
the ingress replica itself, with the bundle kept in the ingress's own LRU cache (one
process, no second hop: a few milliseconds less per request), where concurrent requests
of a model with an expensive call (a TensorFlow graph) share one model call
(:mod:`~mlaas4hep.serve.runtime.microbatch`); larger requests and images
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
(:mod:`mlaas4hep.serve.protocols.kserve_grpc`). A model is named ``"name"`` (latest version) or
``"name/versions/N"``. Run with::

    serve run mlaas4hep.serve.apps.inference:build_tfaas_app
"""

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from mlaas4hep.bundle import (
    BundleError,
    InputError,
    import_keras,
)
from mlaas4hep.serve.body_limit import install_body_limit
from mlaas4hep.serve.dataplane import DataPlane, TFaaSOptions, api_error_of
from mlaas4hep.serve.errors import install_error_handlers
from mlaas4hep.serve.protocols import kserve_grpc, kserve_v2
from mlaas4hep.serve.protocols.tfaas import build_router
from mlaas4hep.serve.runtime.model_server import ModelServer
from mlaas4hep.settings import Settings, load_settings

#: Serve's setting of an ingress replica with ``ingress_on_replica_loop``.
INGRESS_ON_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


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


def create_app(service: DataPlane) -> FastAPI:
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
    app.include_router(kserve_v2.build_router(service), prefix=prefix)
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
        self.service = DataPlane(settings, options, model_server)
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
        """gRPC calls being answered, for :func:`~mlaas4hep.serve.protocols.kserve_grpc.
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
    """Serve application builder (``mlaas4hep.serve.apps.inference:build_tfaas_app``,
    route prefix /).

    Takes :class:`Settings`, or the argument dict of ``serve run``/a Serve config whose
    keys are settings or :class:`TFaaSOptions` fields.
    """
    if isinstance(settings, Settings):
        return tfaas_application(settings)
    args = dict(settings or {})
    option_args = {k: args.pop(k) for k in list(args) if k in TFaaSOptions.model_fields}
    return tfaas_application(load_settings(**args), TFaaSOptions.from_env(**option_args))
