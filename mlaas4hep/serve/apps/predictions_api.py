"""Batch predictions through the pipeline API (``/api/v1/predictions``).

A request names a registered model and ROOT files; it is recorded in storage
(``predictions/<id>/request.json``) and scored by a Ray Job running
``python -m mlaas4hep.serve.batch_predict <request uri>`` (a command made of fixed words
and the platform's id, never of user input), which writes the Parquet scores to
``predictions/<id>/scores/`` and a summary to ``predictions/<id>/result.json``.
"""

import contextlib
import datetime as dt
import re
import secrets
import shlex
import sys
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from mlaas4hep.auth.oidc import Principal
from mlaas4hep.serve.errors import ApiError

PREDICTION_ID = re.compile(r"^pred-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


class PredictionRequest(BaseModel):
    """Score every event of ``files`` with a registered model."""

    model: str = Field(description="Registered model: 'name' (latest) or 'name/versions/N'")
    files: list[str] = Field(min_length=1, max_length=10_000, description="ROOT files")
    tree: str = Field(default="Events", min_length=1, description="TTree path in each file")
    identifier: list[str] = Field(default_factory=list, description="Branches to keep")
    actors: int = Field(default=1, ge=1, le=64, description="Scoring actors")


class PredictionRecord(BaseModel):
    """A batch prediction as the API reports it."""

    id: str
    owner: str
    model: str
    state: str
    message: str = ""
    created: str = ""
    out: str = Field(description="Storage URI of the Parquet scores")
    events: int | None = None
    columns: list[str] = Field(default_factory=list)


def new_prediction_id() -> str:
    now = dt.datetime.now(dt.UTC)
    return f"pred-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def prediction_entrypoint(request_uri: str) -> str:
    """Shell command of the Ray Job that runs one batch prediction."""
    return shlex.join([sys.executable, "-m", "mlaas4hep.serve.batch_predict", request_uri])


def _check_inputs(ctx: Any, name: str, version: int, body: PredictionRequest) -> None:
    """ApiError 4xx unless the model has feature specs and the files hold their branches."""
    from mlaas4hep.data.errors import DataError
    from mlaas4hep.data.features import FeatureSpecs
    from mlaas4hep.data.rootio import inspect_inputs
    from mlaas4hep.serve.batch_predict import scoring_spec

    try:
        specs = FeatureSpecs.from_dict(
            ctx.storage.read_json("models", name, str(version), "specs.json")
        )
    except (FileNotFoundError, ValueError) as error:
        raise ApiError(
            400, f"model {name!r} version {version} has no usable specs.json: {error}"
        ) from None
    try:
        inspect_inputs(scoring_spec(specs, body.files, body.tree, body.identifier))
    except (DataError, ValueError) as error:
        raise ApiError(422, str(error)) from None


def install_prediction_routes(app: FastAPI, ctx: Any, user: Any, submitter: Any) -> None:
    """``POST /predictions`` and ``GET /predictions/{id}`` on ``app`` over the API context."""
    from mlaas4hep.serve.apps.api_resources import user_quota, visible_model
    from mlaas4hep.serve.dataplane import DataPlane
    from mlaas4hep.store.quota import QuotaExceeded

    def _recorded(prediction_id: str, principal: Principal) -> dict[str, Any]:
        missing = ApiError(404, f"prediction {prediction_id!r} not found")
        if not PREDICTION_ID.match(prediction_id):
            raise missing
        try:
            request = ctx.storage.read_json("predictions", prediction_id, "request.json")
        except FileNotFoundError:
            raise missing from None
        if request["owner"] != principal.owner and not principal.is_admin:
            raise missing
        return request

    def _record(request: dict[str, Any], state: str, message: str = "") -> dict[str, Any]:
        return {
            "id": request["id"],
            "owner": request["owner"],
            "model": request["model"],
            "state": state,
            "message": message,
            "created": request["created"],
            "out": request["out"],
        }

    @app.post("/predictions", status_code=201, response_model=PredictionRecord)
    def submit_prediction(body: PredictionRequest, principal: submitter) -> dict:
        """Check the model and start the batch prediction as a Ray Job."""
        name, version = DataPlane.parse_ref(body.model)
        record = visible_model(ctx, name, principal)  # 404 for a model the caller may not see
        version = record.latest if version is None else version
        if version not in record.versions:
            raise ApiError(404, f"model {name!r} has no version {version}")
        try:  # the data-access policy, before any file is opened
            body.files = [
                ctx.policy.resolve(path, f"files[{index}]", principal.owner, None)
                for index, path in enumerate(body.files)
            ]
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        _check_inputs(ctx, name, version, body)
        try:  # its scores count in the caller's quota: none are written once it is full
            user_quota(ctx, principal.owner).check_room(len(body.model_dump_json()))
        except QuotaExceeded as error:
            raise ApiError(413, f"prediction with {name!r}: {error}") from None
        prediction_id = new_prediction_id()
        request = {
            **body.model_dump(),
            "id": prediction_id,
            "owner": principal.owner,
            "model": f"{name}/versions/{version}",
            "storage": ctx.settings.storage,
            "out": ctx.storage.uri("predictions", prediction_id, "scores"),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        ctx.storage.write_json(request, "predictions", prediction_id, "request.json")
        uri = ctx.storage.uri("predictions", prediction_id, "request.json")
        try:
            ctx.jobs.submit(
                prediction_id, principal.owner, uri, entrypoint=prediction_entrypoint(uri)
            )
        except Exception as error:
            raise ApiError(503, f"the cluster did not accept the prediction: {error}") from None
        return _record(request, "PENDING")

    @app.get("/predictions/{prediction_id}", response_model=PredictionRecord)
    def get_prediction(prediction_id: str, principal: user) -> dict:
        """State of a batch prediction; events and columns once it has succeeded."""
        request = _recorded(prediction_id, principal)
        job = ctx.jobs.view(prediction_id)
        record = _record(request, job.state if job else "UNKNOWN", job.message if job else "")
        with contextlib.suppress(FileNotFoundError):
            record.update(ctx.storage.read_json("predictions", prediction_id, "result.json"))
        return record
