"""The MLaaS4HEP server's API (``lgiommi/MLaaS4HEP_server``) on this platform's pipelines.

Same endpoints, arguments and answers as that server documents, served under
``/mlaas4hep`` (that server had its own host, and TFaaS already answers ``/upload``)::

    curl -H "Authorization: Bearer $TOKEN" -F "file=@folder.tar.gz" $URL/mlaas4hep/upload?name=luca
    curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
         -d @submit.json $URL/mlaas4hep/submit          # {"process_name": "luca_1", "job_id": ...}
    curl -H "Authorization: Bearer $TOKEN" $URL/mlaas4hep/status_docker?process_name=luca_1
    curl -H "Authorization: Bearer $TOKEN" -o logs.txt $URL/mlaas4hep/logs?process_name=luca_1
    curl -H "Authorization: Bearer $TOKEN" -o luca_1.tar.gz $URL/mlaas4hep/model?process_name=luca_1
    curl -H "Authorization: Bearer $TOKEN" $URL/mlaas4hep/delete_specs?name=luca
    curl -H "Authorization: Bearer $TOKEN" $URL/mlaas4hep/delete_folder?name=luca

A ``name`` is a folder of the caller's own uploads (``uploads/<owner>/<name>/``) and a
process is one of the caller's pipelines: other users' names and processes do not exist
for them. ``/submit`` builds the pipeline spec from the folder's files.txt, labels.txt,
params.json and model.py exactly as ``mlaas4hep submit --files ...`` does, and runs it as
a Ray Job like any pipeline; the model registers under the process name.
"""

import asyncio
import datetime as dt
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from mlaas4hep import __version__
from mlaas4hep.auth.oidc import Principal
from mlaas4hep.bundle import BundleError, UploadLimits, unpack_tarball
from mlaas4hep.serve.apps.api_resources import (
    model_bundle,
    tarball_response,
    upload_error,
    user_files,
)
from mlaas4hep.serve.apps.context import ApiContext
from mlaas4hep.serve.apps.pipeline_api import SubmitRequest, _record, run_log, start_pipeline
from mlaas4hep.serve.body_limit import install_body_limit
from mlaas4hep.serve.errors import ApiError, install_error_handlers
from mlaas4hep.serve.security import principal_dependency
from mlaas4hep.settings import Settings, as_settings
from mlaas4hep.spec import SpecError, spec_from_mlaas4hep_inputs
from mlaas4hep.store.registry import RegistryError
from mlaas4hep.store.runs import RunState
from mlaas4hep.store.uploads import UploadError, UserFiles, check_upload_path

_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


class SubmitBody(BaseModel):
    """The MLaaS4HEP server's submission (its ``input_new.json``)."""

    name: str = Field(description="Uploaded folder holding the files below")
    files: str = Field(description="File in the folder listing the ROOT files (files.txt)")
    labels: str | None = Field(default=None, description="File with one label per ROOT file")
    model: str = Field(description="Python file in the folder defining model(idim)")
    params: str = Field(description="MLaaS4HEP params.json in the folder")
    device: str = Field(default="cpu", description="cpu or gpu")
    memory: str | None = Field(default=None, description="Memory for the process, e.g. 3gb")
    cpus: str | int | float | None = Field(default=None, description="CPUs for the process")
    fout: str | None = Field(default=None, description="Accepted for compatibility; unused")


class SubmitAnswer(BaseModel):
    process_name: str
    job_id: str


class StatusAnswer(BaseModel):
    process_name: str
    status: str = Field(description="Docker-like status: Created, Up N seconds, Exited (code)")
    state: str = Field(description="The pipeline's state")
    id: str = Field(description="The pipeline's run id in /api/v1/pipelines")


def check_folder(name: str) -> str:
    """``name`` as one folder name of the caller's space; ApiError 400 otherwise."""
    if not _FOLDER.match(name or ""):
        raise ApiError(400, f"name {name!r}: use letters, digits and _.- (at most 48)")
    return name


def _memory_bytes(memory: str | None) -> int | None:
    if memory is None or str(memory).strip() == "":
        return None
    match = _MEMORY.match(str(memory))
    if not match:
        raise ApiError(422, f"memory {memory!r}: write it like 3gb, 512mb or 2048")
    unit = (match[2] or "b").lower()[0]
    return int(float(match[1]) * 1024 ** "bkmgt".index(unit))


def _docker_status(record: dict[str, Any]) -> str:
    state = RunState(record["state"])
    if state == RunState.PENDING:
        return "Created"
    if state == RunState.RUNNING:
        started = dt.datetime.fromisoformat(record.get("created") or record["updated"])
        seconds = int((dt.datetime.now(dt.UTC) - started).total_seconds())
        return f"Up {seconds} seconds"
    code = {RunState.SUCCEEDED: 0, RunState.FAILED: 1, RunState.CANCELLED: 137}[state]
    return f"Exited ({code})"


def create_mlaas4hep_server_api(ctx: ApiContext) -> FastAPI:
    """The MLaaS4HEP server's endpoints over ``ctx`` (the pipeline API's context)."""
    app = FastAPI(
        title="MLaaS4HEP server API",
        version=__version__,
        description="The MLaaS4HEP server's endpoints, on the platform's pipelines. "
        "Bearer token required.",
    )
    install_error_handlers(app)
    cfg = ctx.settings
    install_body_limit(app, cfg.max_request_bytes, cfg.max_upload_bytes, ["POST /upload"])
    User = Annotated[Principal, Depends(principal_dependency(ctx.validator, "use"))]
    Submitter = Annotated[Principal, Depends(principal_dependency(ctx.validator, "submit"))]

    def process(principal: Principal, process_name: str) -> dict[str, Any]:
        """The caller's pipeline named ``process_name``; ApiError 404 otherwise."""
        for record in ctx.runs.list(principal.owner):
            if record.get("process_name") == process_name:
                return _record(ctx, record["id"], principal)
        raise ApiError(404, f"process {process_name!r} not found")

    def own_folder(principal: Principal, name: str) -> UserFiles:
        """The caller's files, after checking their folder ``name`` exists (404 if not)."""
        files = user_files(ctx, principal)
        if not files.exists(check_folder(name)):
            raise ApiError(404, f"folder {name!r} not found")
        return files

    def folder_runs(principal: Principal, name: str) -> list[dict[str, Any]]:
        return [r for r in ctx.runs.list(principal.owner) if r.get("upload_folder") == name]

    @app.post("/upload", response_class=PlainTextResponse)
    async def upload(request: Request, principal: Submitter, name: Annotated[str, Query()]) -> str:
        """Store a gzip tarball of a folder as the caller's folder ``name`` (replacing it)."""
        check_folder(name)
        files = user_files(ctx, principal)
        form = await request.form(max_files=1)
        part = form.get("file")
        if part is None or not hasattr(part, "read"):
            raise ApiError(400, "No file was provided: send the tarball as the 'file' part")
        try:
            await asyncio.to_thread(files.check_declared, part.size, name)
            used, room = await asyncio.to_thread(files.room, name)  # the folder is replaced
        except UploadError as error:
            raise upload_error(error) from None
        data = await part.read(files.max_file_bytes + 1)
        if len(data) > files.max_file_bytes:
            raise ApiError(413, f"{name}: over the upload limit of {files.max_file_bytes} bytes")
        await asyncio.to_thread(_store_folder, ctx, files, name, data, room, used)
        return "Successfully uploaded!\n"

    @app.post("/submit", response_model=SubmitAnswer)
    def submit(body: SubmitBody, principal: Submitter) -> dict:
        """Run MLaaS4HEP's workflow on files of an uploaded folder as a pipeline."""
        name = check_folder(body.name)
        files = user_files(ctx, principal)
        if not files.exists(name):
            raise ApiError(404, f"folder {name!r} not found: upload it first (/upload?name=)")
        taken = [r.get("process_name", "") for r in folder_runs(principal, name)]
        number = 1 + max((int(p.rsplit("_", 1)[1]) for p in taken if p), default=0)
        process_name = f"{name}_{number}"
        try:
            held = ctx.registry.record(process_name)
        except (RegistryError, ValueError):
            held = None
        if held is not None and held.owner != principal.owner:
            raise ApiError(409, f"model name {process_name!r} is taken: use another folder name")
        spec_data, model_source = _spec_of(ctx, files.root, body, process_name)
        if body.device.lower() not in ("cpu", "gpu"):
            raise ApiError(422, f"device {body.device!r}: use cpu or gpu")
        record = start_pipeline(
            ctx,
            SubmitRequest(spec=spec_data, model_source=model_source, model_filename=body.model),
            principal,
            process_name=process_name,
            upload_folder=name,
            requested={"device": body.device, "memory": _memory_bytes(body.memory)},
        )
        return {"process_name": process_name, "job_id": record["id"]}

    @app.get("/status_docker", response_model=StatusAnswer)
    def status_docker(principal: User, process_name: str) -> dict:
        """The process's status, in the words ``docker ps`` used."""
        record = process(principal, process_name)
        return {
            "process_name": process_name,
            "status": _docker_status(record),
            "state": record["state"],
            "id": record["id"],
        }

    @app.get("/logs", response_class=PlainTextResponse)
    def logs(principal: User, process_name: str) -> Response:
        """The process's log as a file attachment."""
        record = process(principal, process_name)
        return PlainTextResponse(
            run_log(ctx, record),
            headers={"Content-Disposition": f'attachment; filename="{process_name}.txt"'},
        )

    # The MLaaS4HEP server answered POST /logs too; one operation in the OpenAPI document.
    app.add_api_route("/logs", logs, methods=["POST"], include_in_schema=False)

    @app.get("/model")
    def model(principal: User, process_name: str) -> Response:
        """The trained model's bundle as a gzip tarball (the TFaaS upload format)."""
        record = process(principal, process_name)
        ref = record.get("model")
        if not ref:
            raise ApiError(
                404,
                f"process {process_name!r} has no model ({record['state'].lower()}"
                f"{': ' + record['message'] if record.get('message') else ''})",
            )
        response = model_bundle(ctx, ref["name"], ref["version"])
        data = response.body
        return tarball_response(data, f"{process_name}.tar.gz")

    @app.get("/delete_specs", response_class=PlainTextResponse)
    def delete_specs(principal: Submitter, name: str) -> str:
        """Delete the specs files in a folder and those its finished pipelines computed."""
        files = own_folder(principal, name)
        for entry in files.list():
            base = entry["path"].rsplit("/", 1)[-1]
            if entry["path"].startswith(name + "/") and re.match(r"^specs.*\.json$", base):
                files.delete(entry["path"])
        for record in folder_runs(principal, name):
            if RunState(record["state"]).finished:
                ctx.storage.delete("runs", record["id"], "specs.json")
        return "Specs deletion completed!\n"

    @app.get("/delete_folder", response_class=PlainTextResponse)
    def delete_folder(principal: Submitter, name: str) -> str:
        """Delete an uploaded folder and the finished pipelines run from it."""
        files = own_folder(principal, name)
        active = [
            r["process_name"]
            for r in folder_runs(principal, name)
            if not RunState(r["state"]).finished
        ]
        if active:
            raise ApiError(409, f"folder {name!r} is in use by {', '.join(active)}: wait or cancel")
        for record in folder_runs(principal, name):
            ctx.jobs.delete(record.get("job_id") or record["id"])
            ctx.runs.delete(record["id"])
        files.delete(name)
        return "Folder deletion completed!\n"

    return app


def _store_folder(
    ctx: ApiContext, files: UserFiles, name: str, data: bytes, room: int, used: int
) -> None:
    """Unpack the tarball ``data`` (at most ``room`` bytes) and store its folder as the
    caller's folder ``name``, whole or not at all, taking its room in the quota."""
    limit = UploadLimits(max_bytes=room, max_member_bytes=room)
    with tempfile.TemporaryDirectory(prefix="mlaas4hep-upload-") as tmp:
        dest = Path(tmp) / "unpacked"
        try:
            unpack_tarball(data, dest, limit)
        except BundleError as error:
            message = str(error)
            if "more than" in message and "bytes" in message:
                raise ApiError(
                    413,
                    f"{name}: {message}; your quota is {ctx.settings.user_quota_bytes} bytes "
                    f"({used} used)",
                ) from None
            raise ApiError(400, f"{name}: {message}") from None
        entries = [p for p in dest.iterdir() if not p.name.startswith(".")] if dest.is_dir() else []
        folder = entries[0] if len(entries) == 1 and entries[0].is_dir() else dest
        if not any(p.is_file() for p in folder.rglob("*")):
            raise ApiError(400, f"{name}: the tarball holds no files")
        try:
            files.put_folder(folder, name)
        except UploadError as error:
            raise upload_error(error) from None


def _spec_of(
    ctx: ApiContext, root: tuple[str, ...], body: SubmitBody, process_name: str
) -> tuple[dict[str, Any], str]:
    """The pipeline spec (as JSON data) and model source of a submission's folder files.

    ``root`` is the caller's uploads (``("uploads", owner)``); the files the spec reads are
    checked by the data-access policy when the pipeline starts, branch-list files now.
    """
    folder = (*root, body.name)
    names = {"files": body.files, "params": body.params, "model": body.model}
    if body.labels:
        names["labels"] = body.labels
    for field, value in names.items():
        try:
            check_upload_path(value)
        except UploadError:
            raise ApiError(
                422, f"{field}: {value!r} is not a file name inside the folder"
            ) from None
        if not ctx.storage.exists(*folder, value):
            raise ApiError(422, f"{field}: {value!r} not found in folder {body.name!r}")
    if not ctx.storage.is_local:
        raise ApiError(501, "the MLaaS4HEP server API needs storage on a shared filesystem")
    path = Path(ctx.storage.path(*folder))
    try:
        spec = spec_from_mlaas4hep_inputs(
            path / body.files,
            path / body.labels if body.labels else None,
            path / body.params,
            name_files=ctx.policy.name_file_reader(root[1], None),
        )
    except (SpecError, ValueError) as error:
        raise ApiError(422, str(error).replace(str(path) + "/", "")) from None
    spec.name = process_name
    if body.device.lower() == "gpu":
        spec.resources.use_gpu = True
        spec.resources.gpus_per_worker = spec.resources.gpus_per_worker or 1.0
    if body.cpus not in (None, ""):
        try:
            cpus = float(body.cpus)
        except ValueError:
            raise ApiError(422, f"cpus {body.cpus!r} is not a number") from None
        if cpus <= 0:
            raise ApiError(422, f"cpus {body.cpus!r} must be positive")
        spec.resources.cpus_per_worker = cpus / spec.resources.workers
    data = spec.model_dump(mode="json")
    data.pop("model", None)
    if isinstance(spec.nan, float) and spec.nan != spec.nan:
        data["nan"] = "nan"
    return data, ctx.storage.read_text(*folder, body.model)


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
@serve.ingress()
class MLaaS4HEPServerAPI:
    """Ray Serve deployment of :func:`create_mlaas4hep_server_api` (at ``/mlaas4hep``)."""

    def __init__(self, settings: Settings) -> None:
        self.ctx = ApiContext.from_settings(settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_mlaas4hep_server_api(self.ctx)


def build_mlaas4hep_server_app(
    settings: Settings | dict[str, Any] | None = None,
) -> serve.Application:
    """The MLaaS4HEP server API as a Serve application (import path for serve configs)."""
    return MLaaS4HEPServerAPI.bind(as_settings(settings))
