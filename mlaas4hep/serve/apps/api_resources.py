"""Routes of the pipeline API for a user's files and models (mounted by ``pipeline_api``).

Files live below ``uploads/<owner>/`` (:class:`~mlaas4hep.store.uploads.UserFiles`);
models are the registry's, seen through their visibility: a model the caller may not
see answers 404 exactly like a missing one.
"""

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from mlaas4hep.auth.oidc import Principal
from mlaas4hep.serve.apps.context import ApiContext
from mlaas4hep.serve.dataplane import DataPlane
from mlaas4hep.serve.errors import ApiError
from mlaas4hep.store.quota import Quota, Reservation
from mlaas4hep.store.registry import ModelRecord, RegistryError
from mlaas4hep.store.storage import Storage
from mlaas4hep.store.uploads import UploadError, UserFiles

CHUNK_BYTES = 1024 * 1024


class FileEntry(BaseModel):
    path: str
    size: int


class FileList(BaseModel):
    files: list[FileEntry]
    used_bytes: int
    quota_bytes: int


class ModelInfo(BaseModel):
    """A registered model as the pipeline API reports it."""

    name: str
    owner: str
    visibility: Literal["private", "group", "public"]
    groups: list[str] = Field(default_factory=list)
    versions: list[int]
    created: str = ""
    format: str = Field(
        default="",
        description="Model format of the latest version, in GET /models/{name} (its "
        "params.json 'format': graphdef, savedmodel, keras, tf_keras, onnx; empty when the "
        "bundle does not say, and in lists)",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class VisibilityRequest(BaseModel):
    """Who may use a model: its owner only, members of ``groups``, or every user."""

    visibility: Literal["private", "group", "public"]
    groups: list[str] | None = Field(
        default=None, description="For 'group': the groups (default: the caller's groups)"
    )


def user_quota(ctx: ApiContext, owner: str) -> Quota:
    """The storage quota of ``owner`` (``user_quota_bytes``)."""
    return Quota(ctx.storage, owner, ctx.settings.user_quota_bytes)


def user_files(
    ctx: ApiContext, principal: Principal, root: tuple[str, ...] | None = None
) -> UserFiles:
    """The caller's files (below ``uploads/<owner>/``, or ``root``) with the configured
    size limit, counted in the caller's quota."""
    return UserFiles(
        ctx.storage,
        root or ("uploads", principal.owner),
        max_file_bytes=ctx.settings.max_upload_bytes,
        quota=user_quota(ctx, principal.owner),
    )


def upload_error(error: UploadError) -> ApiError:
    return ApiError(error.status, error.message)


def declared_size(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


async def _upload_chunks(upload: UploadFile):
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


async def save_upload(
    files: UserFiles, path: str, upload: UploadFile, reservation: Reservation | None = None
) -> int:
    """Store one multipart file part at ``path`` (its room held by ``reservation`` when
    given); ApiError 400/413 when refused."""
    try:
        await asyncio.to_thread(files.check_declared, upload.size, path)
        return await files.save(path, _upload_chunks(upload), upload.size, reservation)
    except UploadError as error:
        raise upload_error(error) from None


def tarball_of(storage: Storage, *parts: str) -> bytes:
    """A gzip tarball of the folder ``parts`` with its files at the top (a TFaaS bundle)."""
    buffer = io.BytesIO()
    with storage.local_copy(*parts) as folder, tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def tarball_response(data: bytes, filename: str) -> Response:
    return Response(
        content=data,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def install_file_routes(app: FastAPI, ctx: ApiContext, user: Any) -> None:
    """``/files``: upload (multipart or raw body), list, download, delete the caller's files."""

    @app.post("/files", status_code=201, response_model=FileList)
    async def upload_files(request: Request, principal: user) -> dict:
        """Upload files as multipart parts; each is stored under its part's filename, or
        under ``path`` (a form field) when one file is sent. Refused whole (413) past the
        size limit or the quota."""
        files = user_files(ctx, principal)
        form = await request.form(max_files=1000)
        uploads = [v for v in form.values() if isinstance(v, UploadFile) or hasattr(v, "read")]
        if not uploads:
            raise ApiError(400, "no file in the multipart form (send a 'file' part)")
        target = form.get("path")
        if isinstance(target, str) and target and len(uploads) != 1:
            raise ApiError(400, "'path' names one file; send one file with it")
        for upload in uploads:
            name = target if isinstance(target, str) and target else (upload.filename or "")
            await save_upload(files, name, upload)
        return await asyncio.to_thread(_listing, files)

    @app.put("/files/{path:path}", status_code=201, response_model=FileEntry)
    async def put_file(path: str, request: Request, principal: user) -> dict:
        """Upload one file as the raw request body, streamed to storage."""
        files = user_files(ctx, principal)
        try:
            size = declared_size(request)
            await asyncio.to_thread(files.check_declared, size, path)
            size = await files.save(path, request.stream(), size)
        except UploadError as error:
            raise upload_error(error) from None
        return {"path": path.strip("/"), "size": size}

    @app.get("/files", response_model=FileList)
    def list_files(principal: user) -> dict:
        """The caller's files with their sizes, and the quota used."""
        return _listing(user_files(ctx, principal))

    @app.get("/files/{path:path}")
    def get_file(path: str, principal: user) -> Response:
        """One of the caller's files."""
        try:
            data = user_files(ctx, principal).read(path)
        except UploadError as error:
            raise upload_error(error) from None
        return Response(content=data, media_type="application/octet-stream")

    @app.delete("/files/{path:path}")
    def delete_file(path: str, principal: user) -> dict:
        """Delete one of the caller's files or folders."""
        try:
            user_files(ctx, principal).delete(path)
        except UploadError as error:
            raise upload_error(error) from None
        return {"deleted": path.strip("/")}


def _listing(files: UserFiles) -> dict:
    return {"files": files.list(), "used_bytes": files.usage(), "quota_bytes": files.quota_bytes}


def may_see(record: ModelRecord, principal: Principal) -> bool:
    """Whether ``principal`` may see and use the model (its visibility allows it)."""
    return DataPlane.may_use(record, principal)


def visible_model(ctx: ApiContext, name: str, principal: Principal) -> ModelRecord:
    """The record of ``name`` if the caller may see it; ApiError 404 otherwise."""
    try:
        record = ctx.registry.record(name)
    except (RegistryError, ValueError):
        raise ApiError(404, f"model {name!r} not found") from None
    if not may_see(record, principal):
        raise ApiError(404, f"model {name!r} not found")
    return record


def _info(record: ModelRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "owner": record.owner,
        "visibility": record.visibility,
        "groups": record.groups,
        "versions": record.versions,
        "created": record.created,
    }


def model_bundle(ctx: ApiContext, name: str, version: int | None) -> Response:
    """The registered bundle of ``name`` (latest version when ``None``) as a TFaaS tarball."""
    try:
        entry = ctx.registry.get(name, version)
    except RegistryError as error:
        raise ApiError(404, str(error)) from None
    data = tarball_of(ctx.storage, "models", name, str(entry.version))
    return tarball_response(data, f"{name}-{entry.version}.tar.gz")


def install_model_routes(app: FastAPI, ctx: ApiContext, user: Any) -> None:
    """``/models``: list, describe, download and set the visibility of models."""

    @app.get("/models", response_model=ModelList)
    def list_models(principal: user, mine: bool = False) -> dict:
        """Models the caller may use (``mine=true``: only their own)."""
        records = [r for r in ctx.registry.list_records() if may_see(r, principal)]
        if mine:
            records = [r for r in records if r.owner == principal.owner]
        return {"models": [_info(r) for r in records]}

    @app.get("/models/{name}", response_model=ModelInfo)
    def get_model(name: str, principal: user) -> dict:
        """One model: owner, visibility, versions."""
        record = visible_model(ctx, name, principal)
        try:
            params = ctx.storage.read_json("models", name, str(record.latest), "params.json")
        except (FileNotFoundError, ValueError):
            params = {}
        return {**_info(record), "format": str(params.get("format") or "")}

    @app.get("/models/{name}/bundle")
    def latest_bundle(name: str, principal: user) -> Response:
        """The latest version's bundle as a gzip tarball TFaaS accepts (``POST /upload``)."""
        visible_model(ctx, name, principal)
        return model_bundle(ctx, name, None)

    @app.get("/models/{name}/versions/{version}/bundle")
    def version_bundle(name: str, version: int, principal: user) -> Response:
        """One version's bundle as a gzip tarball."""
        visible_model(ctx, name, principal)
        return model_bundle(ctx, name, version)

    @app.put("/models/{name}/visibility", response_model=ModelInfo)
    def set_visibility(name: str, request: VisibilityRequest, principal: user) -> dict:
        """Make a model private, visible to groups, or public (owner or administrator)."""
        record = visible_model(ctx, name, principal)
        if record.owner != principal.owner and not principal.is_admin:
            raise ApiError(403, f"model {name!r} belongs to another user")
        groups = None
        if request.visibility == "group":
            groups = request.groups if request.groups is not None else list(principal.groups)
            if not groups:
                raise ApiError(422, "visibility 'group' needs groups (you belong to none)")
        ctx.registry.set_visibility(name, request.visibility, groups)
        return _info(ctx.registry.record(name))
