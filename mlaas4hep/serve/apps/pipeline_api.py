"""The pipeline API (``/api/v1``): submit pipelines and follow them, behind a bearer token.

:func:`create_pipeline_api` builds the FastAPI app from an :class:`ApiContext`, so the same
routes run inside the Ray Serve deployment :class:`PipelineAPI` and in plain ASGI tests.
Submissions are checked here (spec fields, files, tree, model file syntax) and run as Ray
Jobs; user code never runs in this process.
"""

import asyncio
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from ray import serve

from mlaas4hep import __version__
from mlaas4hep.auth.oidc import Principal
from mlaas4hep.pipeline.jobs import JobsUnavailable
from mlaas4hep.pipeline.reconcile import Reconciler, settle_run
from mlaas4hep.serve.apps.api_resources import (
    install_file_routes,
    install_model_routes,
    save_upload,
    user_files,
    user_quota,
)
from mlaas4hep.serve.apps.context import ApiContext
from mlaas4hep.serve.apps.predictions_api import install_prediction_routes
from mlaas4hep.serve.body_limit import install_body_limit
from mlaas4hep.serve.errors import ApiError, install_error_handlers
from mlaas4hep.serve.security import principal_dependency
from mlaas4hep.settings import Settings, as_settings
from mlaas4hep.spec import (
    ModelSpec,
    PipelineSpec,
    SpecError,
    parse_spec,
    read_spec_text,
)
from mlaas4hep.store.quota import QuotaExceeded
from mlaas4hep.store.registry import ModelNameTaken
from mlaas4hep.store.runs import (
    RunNotFound,
    RunState,
    RunStateConflict,
    new_run_id,
)

#: Run artifacts a client may download, besides plots/<name>.png.
ARTIFACTS = ("spec.json", "specs.json", "metrics.json", "history.json", "status.json", "log")
MAX_MODEL_SOURCE_BYTES = 1_000_000
#: Ray resources counted in bytes, not units: left to the cluster's placement check.
MEMORY_RESOURCES = frozenset({"memory", "object_store_memory"})
#: Room held for a new run's record (status.json) besides its submitted spec and model,
#: until the run's files are counted as its owner's.
RUN_RECORD_BYTES = 2048
#: Routes whose bodies carry uploaded files (bounded by ``max_upload_bytes``).
UPLOAD_ROUTES = ("POST /files", "POST /pipelines/upload")  # multipart bodies
RAW_UPLOAD_ROUTES = ("PUT /files/.+",)  # the body is the file
LOG_POLL_SECONDS = 1.0
#: A model file name as a submission may give it (its last path part).
MODEL_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}$")


class SubmitRequest(BaseModel):
    """A pipeline submission: the spec and, optionally, the source of its model file."""

    spec: dict[str, Any] = Field(description="Pipeline spec with MLaaS4HEP key names")
    model_source: str | None = Field(
        default=None,
        max_length=MAX_MODEL_SOURCE_BYTES,
        description="Python source defining model(idim); replaces spec.model.file",
    )
    model_filename: str = Field(
        default="model.py",
        max_length=128,
        description="Name of the model file in messages (its last path part is used)",
    )

    @field_validator("model_filename")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        name = PurePosixPath(value.replace("\\", "/")).name
        if not MODEL_FILENAME.match(name):
            raise ValueError(
                f"{value!r} is not a file name (letters, digits and _.+=@- only, "
                "not starting with a dot or dash)"
            )
        return value


class ModelRef(BaseModel):
    name: str
    version: int


class PipelineRecord(BaseModel):
    """A pipeline run as the API reports it."""

    id: str
    owner: str
    name: str
    state: str
    stage: str = ""
    message: str = ""
    created: str = ""
    updated: str = ""
    progress: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef | None = None
    job_id: str | None = None
    resumes: int = 0


class PipelineList(BaseModel):
    pipelines: list[PipelineRecord]


def _check_submission(
    ctx: ApiContext, request: SubmitRequest, principal: Principal, run_id: str
) -> tuple[PipelineSpec, str | None]:
    """Validate the spec, the data it reads (the data-access policy), the model source
    and the caller's limits, all before anything is opened; then its inputs. Raise
    ApiError 4xx naming the fault.

    Returns the spec with every path resolved, and the model source.
    """
    owner = principal.owner
    from mlaas4hep.data.errors import DataError
    from mlaas4hep.data.rootio import inspect_inputs
    from mlaas4hep.train.model_file import ModelSourceError, check_model_file

    spec_data = dict(request.spec)
    if request.model_source is not None:
        spec_data.pop("model", None)  # the source sent replaces any model of the spec
    try:
        named = parse_spec(spec_data, "spec", ctx.policy.name_file_reader(owner, run_id))
        spec = ctx.policy.check_spec(named, owner, run_id)
    except SpecError as error:
        raise ApiError(422, str(error)) from None
    if request.model_source is not None:
        spec.model = ModelSpec(file=request.model_filename)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(request.model_filename).name
            path.write_text(request.model_source)
            try:
                check_model_file(str(path))
            except ModelSourceError as error:
                raise ApiError(422, str(error).replace(str(path), request.model_filename)) from None
    elif spec.model.file:
        raise ApiError(
            422, "spec.model.file: send the model file's source as model_source with the spec"
        )
    check_limits(ctx, spec, principal)
    try:
        inspect_inputs(spec)
    except DataError as error:
        raise ApiError(422, _as_named(str(error), spec, named)) from None
    return spec, request.model_source


def _as_named(message: str, resolved: PipelineSpec, named: PipelineSpec) -> str:
    """``message`` with each resolved input path put back as the submission ``named`` it,
    so answers never show where the platform keeps a user's files."""
    for item, original in zip(resolved.files, named.files, strict=True):
        message = message.replace(item.path, original.path)
    return message


def _over_limit(field: str, what: str, value: float, limit: float) -> ApiError:
    return ApiError(
        422,
        f"spec.resources.{field}: the pipeline asks for {value:g} {what}; "
        f"at most {limit:g} per pipeline",
    )


def check_limits(ctx: ApiContext, spec: PipelineSpec, principal: Principal) -> None:
    """ApiError 429/422 when ``principal`` has too many active pipelines or ``spec`` asks
    for more than one pipeline may (``max_*_per_pipeline`` settings).

    Counts what Ray is really asked for: each training worker's resources as the trainer
    asks them (``resources_per_worker`` overrides the CPUs and GPUs per worker), times the
    workers of every trial a Tune search runs at once, and each Ray Data read task's
    ``read_resources`` besides the CPU it takes.
    """
    from mlaas4hep.train.trainer import worker_resources

    cfg = ctx.settings
    res = spec.resources
    trials = spec.tune.max_concurrent_trials if spec.tune else 1
    workers = res.workers * trials  # unset: the most the cluster fit can choose
    times = f"{trials} concurrent trials x {res.workers} workers" if trials > 1 else ""
    if workers > cfg.max_workers_per_pipeline:
        what = f"workers ({times})" if times else "workers"
        raise _over_limit("num_workers", what, workers, cfg.max_workers_per_pipeline)
    limits = {"CPU": cfg.max_cpus_per_pipeline, "GPU": cfg.max_gpus_per_pipeline}
    for key, per_worker in worker_resources(res).items():
        limit = limits.get(key, cfg.max_custom_resources_per_pipeline)
        total = per_worker * workers
        if key not in MEMORY_RESOURCES and total > limit:
            field = "resources_per_worker" if key in res.resources_per_worker else None
            field = field or {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}[key]
            what = f"{key} ({times or f'{workers} workers'} x {per_worker:g})"
            raise _over_limit(field, what, total, limit)
    for key, value in res.read_resources.items():
        if key in {"CPU", "GPU", *MEMORY_RESOURCES}:
            raise ApiError(
                422,
                f"spec.resources.read_resources: {key!r} cannot be asked per read task "
                "(each takes one CPU); name custom resources only",
            )
        limit = cfg.max_custom_resources_per_pipeline
        if value > limit:
            raise _over_limit("read_resources", f"{key} per read task", value, limit)
    active = [r for r in ctx.runs.list(principal.owner) if not RunState(r["state"]).finished]
    if len(active) >= cfg.max_active_pipelines:
        raise ApiError(
            429,
            f"you have {len(active)} pipelines pending or running, the limit is "
            f"{cfg.max_active_pipelines}: wait for one to finish or cancel one",
        )


def start_pipeline(
    ctx: ApiContext,
    request: SubmitRequest,
    principal: Principal,
    run_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Check a submission and the caller's limits, record it and start its Ray Job.

    ``fields`` are stored in the run's record. Returns the record.
    """
    run_id = run_id or new_run_id()
    # The run's files count in the owner's quota once its record names the owner: their
    # room is held till then, and a full quota refuses the submission (413) at once.
    quota = user_quota(ctx, principal.owner)
    needed = len(request.model_dump_json()) + RUN_RECORD_BYTES
    try:
        with quota.holding(needed):
            spec, model_source = _check_submission(ctx, request, principal, run_id)
            reserve_model_name(ctx, spec.name, principal, defaulted="name" not in request.spec)
            if model_source is not None:
                ctx.storage.write_text(model_source, "runs", run_id, "model.py")
                spec.model.file = ctx.storage.uri("runs", run_id, "model.py")
            ctx.storage.write_text(spec.to_json(), "runs", run_id, "spec.json")
            ctx.runs.create(
                run_id,
                owner=principal.owner,
                name=spec.name,
                job_id=run_id,
                quota_bytes=quota.limit,
                **fields,
            )
    except QuotaExceeded as error:
        raise ApiError(413, f"pipeline submission: {error}") from None
    try:
        ctx.jobs.submit(run_id, principal.owner, ctx.runs.spec_uri(run_id))
    except Exception as error:
        ctx.runs.update(run_id, state=RunState.FAILED, message=f"submission failed: {error}")
        raise ApiError(503, f"the cluster did not accept the pipeline: {error}") from None
    return ctx.runs.get(run_id)


def reserve_model_name(
    ctx: ApiContext, name: str, principal: Principal, defaulted: bool = False
) -> None:
    """Hold the model name a pipeline will register for its submitter, now: ApiError 409
    when another user holds it (rather than a failed registration after training).
    ``defaulted``: the spec gave no name, ``name`` is the default one."""
    try:
        ctx.registry.reserve(name, principal.owner)
    except ModelNameTaken:
        given = " (the default: the spec names none)" if defaulted else ""
        raise ApiError(
            409,
            f"spec.name: model name {name!r}{given} belongs to another user; choose another",
        ) from None


def resume_pipeline(ctx: ApiContext, record: dict[str, Any]) -> dict[str, Any]:
    """Submit a new Ray Job (id ``<run_id>-r<n>``) for the cancelled or failed run ``record``.

    The job runs the run's stored spec under the same run id, so the trainer finds the
    checkpoints kept under it. ApiError 409 when the run cannot be resumed (yet).
    """
    run_id, state = record["id"], RunState(record["state"])
    if state not in {RunState.FAILED, RunState.CANCELLED}:
        raise ApiError(
            409, f"pipeline {run_id!r} is {state.lower()}: only a cancelled or failed one resumes"
        )
    previous = ctx.jobs.view(record.get("job_id") or run_id)
    if previous is not None and previous.state in {"PENDING", "RUNNING"}:
        raise ApiError(
            409, f"pipeline {run_id!r}: its job {previous.job_id} is still stopping; retry soon"
        )
    resumes = int(record.get("resumes") or 0) + 1
    job_id = f"{run_id}-r{resumes}"
    try:  # only from the state just checked: of two resumes at once, one starts a job
        ctx.runs.update(
            run_id,
            only_if={state},
            state=RunState.PENDING,
            stage="resuming",
            message="",
            job_id=job_id,
            resumes=resumes,
        )
    except RunStateConflict as error:
        raise ApiError(409, f"pipeline {run_id!r}: {error.state.lower()} meanwhile") from None
    try:
        ctx.jobs.submit(run_id, record["owner"], ctx.runs.spec_uri(run_id), job_id=job_id)
    except Exception as error:
        ctx.runs.update(run_id, state=RunState.FAILED, message=f"resume failed: {error}")
        raise ApiError(503, f"the cluster did not accept the pipeline: {error}") from None
    return ctx.runs.get(run_id)


def run_log(ctx: ApiContext, record: dict[str, Any]) -> str:
    """A run's log: the Ray job's output, or the stored log once Ray forgot the job."""
    logs = ctx.jobs.logs(record.get("job_id") or record["id"])
    if logs:
        return logs
    try:
        return ctx.storage.read_text("runs", record["id"], "log")
    except FileNotFoundError:
        return ""


def _record(ctx: ApiContext, run_id: str, principal: Principal) -> dict[str, Any]:
    """The run's record if the caller may see it, with the Ray job's view merged in."""
    try:
        record = ctx.runs.get(run_id)
    except RunNotFound:
        raise ApiError(404, f"pipeline {run_id!r} not found") from None
    if record.get("owner") != principal.owner and not principal.is_admin:
        raise ApiError(404, f"pipeline {run_id!r} not found")
    try:
        return settle_run(ctx.settler, record)
    except JobsUnavailable:  # the head is down: the record as it stands
        return record


async def _form_text(value: Any, field: str) -> str:
    """A multipart field's text, whether sent as a plain field or as a file."""
    if isinstance(value, str):
        return value
    if value is not None and hasattr(value, "read"):
        data = await value.read(MAX_MODEL_SOURCE_BYTES + 1)
        if len(data) > MAX_MODEL_SOURCE_BYTES:
            raise ApiError(413, f"{field}: larger than {MAX_MODEL_SOURCE_BYTES} bytes")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ApiError(422, f"{field}: not UTF-8 text") from None
    raise ApiError(422, f"multipart form has no {field!r} part")


def install_multipart_submit(app: FastAPI, ctx: ApiContext, submitter: Any) -> None:
    """``POST /pipelines/upload``: a submission as a multipart form with its files."""

    @app.post("/pipelines/upload", status_code=201, response_model=PipelineRecord)
    async def submit_multipart(request: Request, principal: submitter) -> dict:
        """Submit with files: ``spec`` (YAML or JSON), optional ``model`` (model.py) and any
        number of ``data`` files. Spec entries naming a data file by its name read the
        uploaded copy, which is kept with the run and deleted with it."""
        form = await request.form(max_files=1000)
        spec_text = await _form_text(form.get("spec"), "spec")
        try:
            spec_data = read_spec_text(spec_text, "spec")
        except SpecError as error:
            raise ApiError(422, str(error)) from None
        model = form.get("model")
        model_source = None if model is None else await _form_text(model, "model")
        run_id = new_run_id()
        # Uploaded inputs belong to the run: deleting the run deletes them. They count in
        # the caller's quota: their room is held until the run's record names its owner.
        inputs = user_files(ctx, principal, ("runs", run_id, "inputs"))
        held = inputs.quota.reservation()
        uploaded: dict[str, str] = {}
        try:
            for upload in form.getlist("data"):
                if not hasattr(upload, "read"):
                    raise ApiError(422, "multipart 'data' parts must be files")
                name = Path(upload.filename or "").name
                await save_upload(inputs, name, upload, held)
                uploaded[name] = ctx.storage.uri("runs", run_id, "inputs", name)
            files = spec_data.get("files")
            if isinstance(files, list):
                spec_data["files"] = [
                    {**f, "path": uploaded.get(f.get("path"), f.get("path"))}
                    if isinstance(f, dict)
                    else uploaded.get(f, f)
                    for f in files
                ]
            for key in ("specs", "preproc"):  # a specs.json or preproc.json sent as data
                if isinstance(spec_data.get(key), str):
                    spec_data[key] = uploaded.get(spec_data[key], spec_data[key])
            if model_source is not None:
                spec_data.pop("model", None)
            body = SubmitRequest(spec=spec_data, model_source=model_source)
            return await asyncio.to_thread(start_pipeline, ctx, body, principal, run_id)
        except BaseException as error:
            if isinstance(error, ApiError):  # name the files as the user sent them
                for name, uri in uploaded.items():
                    error.message = error.message.replace(uri, name)
            if not ctx.storage.exists("runs", run_id, "status.json"):
                ctx.storage.delete("runs", run_id)
            raise
        finally:
            await asyncio.to_thread(held.release)


def create_pipeline_api(ctx: ApiContext) -> FastAPI:
    """The ``/api/v1`` FastAPI app over ``ctx``."""
    app = FastAPI(
        title="mlaas4hep pipeline API",
        version=__version__,
        description="Submit ML pipelines on ROOT files and follow them. Bearer token required.",
    )
    install_error_handlers(app)
    cfg = ctx.settings
    install_body_limit(
        app, cfg.max_request_bytes, cfg.max_upload_bytes, UPLOAD_ROUTES, RAW_UPLOAD_ROUTES
    )
    User = Annotated[Principal, Depends(principal_dependency(ctx.validator, "use"))]
    Submitter = Annotated[Principal, Depends(principal_dependency(ctx.validator, "submit"))]

    @app.get("/whoami")
    def whoami(principal: User) -> dict[str, Any]:
        """The caller as the platform sees them."""
        return {
            "sub": principal.sub,
            "issuer": principal.issuer,
            "owner": principal.owner,
            "groups": list(principal.groups),
            "scopes": list(principal.scopes),
            "admin": principal.is_admin,
        }

    install_prediction_routes(app, ctx, User, Submitter)

    @app.post("/pipelines", status_code=201, response_model=PipelineRecord)
    def submit(request: SubmitRequest, principal: Submitter) -> dict:
        """Check a submission and start it as a Ray Job."""
        return start_pipeline(ctx, request, principal)

    @app.get("/pipelines", response_model=PipelineList)
    def list_pipelines(
        principal: User,
        state: str | None = None,
        name: str | None = None,
        owner: str | None = None,
        limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    ) -> dict:
        """The caller's pipelines (every pipeline for administrators), newest first.

        Filters: ``state`` (comma-separated), ``name`` (the spec's model name), ``owner``
        (administrators only), ``limit`` (newest N).
        """
        if owner is not None and not principal.is_admin and owner != principal.owner:
            raise ApiError(403, "only administrators list other users' pipelines")
        records = ctx.runs.list(owner or (None if principal.is_admin else principal.owner))
        if state:
            states = {s.strip().upper() for s in state.split(",")}
            records = [r for r in records if r.get("state") in states]
        if name:
            records = [r for r in records if r.get("name") == name]
        return {"pipelines": records[:limit]}

    @app.get("/pipelines/{run_id}", response_model=PipelineRecord)
    def get_pipeline(run_id: str, principal: User) -> dict:
        """One pipeline: state, stage, progress, metrics and the model it registered."""
        return _record(ctx, run_id, principal)

    @app.get("/pipelines/{run_id}/logs", response_class=PlainTextResponse)
    def pipeline_logs(run_id: str, principal: User, follow: bool = False) -> Response:
        """The pipeline's log: the Ray job's output, or the stored log once Ray forgot it.

        With ``follow=true`` the answer streams the log as it grows and ends when the
        pipeline finishes.
        """
        record = _record(ctx, run_id, principal)
        if not follow:
            return PlainTextResponse(run_log(ctx, record))

        def stream() -> Iterator[str]:
            sent = 0
            while True:
                latest = _record(ctx, run_id, principal)
                text = run_log(ctx, latest)
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if RunState(latest["state"]).finished:
                    return
                time.sleep(LOG_POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/plain")

    @app.get("/pipelines/{run_id}/artifacts")
    def list_artifacts(run_id: str, principal: User) -> dict:
        """Names of the run's artifacts."""
        _record(ctx, run_id, principal)
        names = [n for n in ARTIFACTS if ctx.storage.exists("runs", run_id, n)]
        names += [f"plots/{n}" for n in ctx.storage.listdir("runs", run_id, "plots")]
        return {"artifacts": names}

    @app.get("/pipelines/{run_id}/artifacts/{name:path}")
    def get_artifact(run_id: str, name: str, principal: User) -> Response:
        """One artifact: JSON files, the log, or a PNG plot."""
        _record(ctx, run_id, principal)
        is_plot = name.startswith("plots/") and name.count("/") == 1 and name.endswith(".png")
        if name not in ARTIFACTS and not is_plot:
            raise ApiError(404, f"artifact {name!r} not found")
        try:
            data = ctx.storage.read_bytes("runs", run_id, name)
        except FileNotFoundError:
            raise ApiError(404, f"artifact {name!r} not found") from None
        media = (
            "image/png"
            if is_plot
            else ("application/json" if name.endswith(".json") else "text/plain")
        )
        return Response(content=data, media_type=media)

    @app.post("/pipelines/{run_id}/cancel", response_model=PipelineRecord)
    def cancel(run_id: str, principal: Submitter) -> dict:
        """Stop a pending or running pipeline."""
        record = _record(ctx, run_id, principal)
        if RunState(record["state"]).finished:
            raise ApiError(409, f"pipeline {run_id!r} already {record['state'].lower()}")
        ctx.jobs.stop(record.get("job_id") or run_id)
        try:  # a run that ended meanwhile keeps how it ended
            return ctx.runs.update(
                run_id,
                only_if={RunState.PENDING, RunState.RUNNING},
                state=RunState.CANCELLED,
                message="cancelled by the user",
            )
        except RunStateConflict as error:
            raise ApiError(409, f"pipeline {run_id!r} already {error.state.lower()}") from None

    @app.delete("/pipelines/{run_id}")
    def delete(run_id: str, principal: Submitter) -> dict:
        """Delete a finished pipeline's record, logs and artifacts (not its registered model)."""
        record = _record(ctx, run_id, principal)
        if not RunState(record["state"]).finished:
            raise ApiError(
                409, f"pipeline {run_id!r} is {record['state'].lower()}: cancel it first"
            )
        job = ctx.jobs.view(record.get("job_id") or run_id)
        if job is not None and job.state in {"PENDING", "RUNNING"}:
            # A stopping job could still write into the run's folder after it is deleted.
            raise ApiError(409, f"pipeline {run_id!r} is still stopping: retry in a few seconds")
        ctx.jobs.delete(record.get("job_id") or run_id)
        ctx.runs.delete(run_id)
        return {"deleted": run_id}

    @app.post("/pipelines/{run_id}/resume", response_model=PipelineRecord)
    def resume(run_id: str, principal: Submitter) -> dict:
        """Run a cancelled or failed pipeline again as a new Ray Job of the same run:
        training continues from the run's latest checkpoint."""
        return resume_pipeline(ctx, _record(ctx, run_id, principal))

    install_file_routes(app, ctx, User)
    install_model_routes(app, ctx, User)
    install_multipart_submit(app, ctx, Submitter)
    return app


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
@serve.ingress()
class PipelineAPI:
    """Ray Serve deployment serving :func:`create_pipeline_api` (at ``/api/v1``)."""

    def __init__(self, settings: Settings) -> None:
        self.ctx = ApiContext.from_settings(settings)
        self.reconciler = Reconciler(self.ctx.settler, settings.reconcile_interval_s)
        self.reconciler.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_pipeline_api(self.ctx)

    def __del__(self) -> None:
        self.reconciler.stop()


def build_api_app(settings: Settings | dict[str, Any] | None = None) -> serve.Application:
    """The pipeline API as a Serve application (import path for serve configs)."""
    return PipelineAPI.bind(as_settings(settings))
