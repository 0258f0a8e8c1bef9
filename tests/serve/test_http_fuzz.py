"""Every route of the committed OpenAPI documents answers bad input with a 4xx, never a 500.

Hypothesis builds requests from the documents of ``docs/openapi`` (pipeline API,
MLaaS4HEP server API, inference API): each operation with path and query values
drawn from awkward strings (empty, dots, slashes, NUL, long, non-ASCII, ids of things
that exist), JSON bodies with the schema's fields holding any JSON value, multipart
forms and raw bodies of random parts, with a good token, a bad one or none; a sweep
also sends every awkward value to every path parameter. The apps run in process over
a storage folder seeded with a file, a model and a finished run (:mod:`api_fixtures`).
An answer fails the test when it is a 500, any other 5xx but the documented ones, or
an error without the ``{"error": "..."}`` body.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest
from api_fixtures import LocalApis
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from state_workers import write_test_bundle

from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunState, RunStore, new_run_id

USER = "fuzzer"
#: 5xx answers a route may give without a fault: no cluster or model server behind it
#: (503), a feature that needs a shared filesystem (501), a full disk (507).
ALLOWED_5XX = {501, 503, 507}
#: Each committed OpenAPI document and where :class:`LocalApis` serves its app.
DOCUMENTS = {
    "pipeline-api.json": "/api/v1",
    "mlaas4hep-server-api.json": "/mlaas4hep",
    "inference-api.json": "/tfaas",
}
RUN_ID = new_run_id()
AWKWARD = [
    "",
    ".",
    "..",
    "../..",
    "/",
    "//",
    "a/../..",
    "..%2f..",
    "\x00",
    "a\x00b",
    "~",
    "ü/ß",
    "x" * 300,
    " ",
    ".hidden",
    "-dash",
    "CON",
    "models",
    "keep",
    "keep/me.txt",
    "keep/me.txt/deeper",
    "fuzzmodel",
    "fuzzmodel/versions/1",
    "versions/0",
    RUN_ID,
    "run-00000000-000000-000000",
    "pred-00000000-000000-000000",
    "spec.json",
    "plots/x.png",
    "status.json",
    "-1",
    "0",
    "99999999999999999999",
    "1e309",
    "nan",
    "true",
]

awkward_text = st.one_of(st.sampled_from(AWKWARD), st.text(max_size=24))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | awkward_text,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "path", "files", "x", ""]) | awkward_text, inner, max_size=4
        )
    ),
    max_leaves=12,
)


def operations(document: str, prefix: str) -> list[dict[str, Any]]:
    """Every operation of an OpenAPI document, with its body schema resolved."""
    spec = json.loads((REPO / "docs" / "openapi" / document).read_text())
    schemas = spec.get("components", {}).get("schemas", {})
    found = []
    for path, methods in sorted(spec["paths"].items()):
        for method, operation in sorted(methods.items()):
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            schema = body["schema"] if body else None
            if schema and "$ref" in schema:
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            found.append(
                {
                    "method": method.upper(),
                    "path": prefix + path,
                    "parameters": operation.get("parameters", []),
                    "schema": schema,
                }
            )
    return found


def json_bodies(schema: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    """Objects with some of the schema's fields holding any JSON value, or any JSON."""
    fields = sorted((schema or {}).get("properties", {}))
    shaped = st.fixed_dictionaries({}, optional={name: json_values for name in fields})
    return st.one_of(shaped, json_values)


multipart_parts = st.lists(
    st.tuples(
        st.sampled_from(["file", "spec", "model", "data", "path", "name"]) | awkward_text,
        st.one_of(st.none(), awkward_text),  # a filename: a file part, else a field
        st.binary(max_size=64) | st.sampled_from([b"name: x\nfiles: []\n", b"{}", b"\xff"]),
    ),
    max_size=4,
)


def with_path_values(op: dict[str, Any], values: dict[str, str]) -> str:
    """The operation's URL with its path parameters set to ``values`` (a last parameter
    keeps its slashes: ``{path:path}`` routes take them)."""
    url = op["path"]
    for name, value in values.items():
        keep = "/" if url.endswith("{" + name + "}") else ""
        url = url.replace("{" + name + "}", urllib.parse.quote(value, safe=keep))
    return url


def path_names(op: dict[str, Any]) -> list[str]:
    return [p["name"] for p in op["parameters"] if p["in"] == "path"]


@st.composite
def requests(draw: st.DrawFn, op: dict[str, Any]) -> dict[str, Any]:
    """One request of the operation ``op``: method, URL and what it sends."""
    url = with_path_values(op, {name: draw(awkward_text) for name in path_names(op)})
    query = {
        p["name"]: draw(awkward_text)
        for p in op["parameters"]
        if p["in"] == "query" and draw(st.booleans())
    }
    sent: dict[str, Any] = {"method": op["method"], "url": url, "params": query}
    if op["schema"] is not None:
        sent["json"] = draw(json_bodies(op["schema"]))
    elif op["method"] in {"POST", "PUT"}:
        kind = draw(st.sampled_from(["multipart", "raw", "none"]))
        if kind == "multipart":
            parts = draw(multipart_parts)
            sent["files"] = [
                (name, (filename, data) if filename is not None else data.decode("latin-1"))
                for name, filename, data in parts
            ] or None
            if sent["files"] is None:
                sent["data"] = {"x": "y"}
        elif kind == "raw":
            sent["content"] = draw(st.binary(max_size=128))
    sent["auth"] = draw(st.sampled_from(["good", "good", "good", "bad", "none"]))
    return sent


@pytest.fixture(scope="module")
def seeded(local_apis: LocalApis, tmp_path_factory: pytest.TempPathFactory) -> LocalApis:
    """The APIs with a model and a finished run of the fuzzing user."""
    owner = local_apis.owner(USER)
    bundle = write_test_bundle(tmp_path_factory.mktemp("fuzz") / "b", "fuzzmodel", owner)
    ModelRegistry(local_apis.storage).register("fuzzmodel", bundle, owner)
    RunStore(local_apis.storage).create(
        RUN_ID, owner=owner, name="fuzzmodel", state=RunState.SUCCEEDED.value
    )
    local_apis.storage.write_text("{}", "runs", RUN_ID, "spec.json")
    return local_apis


@pytest.fixture
def fuzzed(seeded: LocalApis) -> LocalApis:
    """The seeded APIs with the fuzzing user's file ``keep/me.txt`` (put back if a test
    before deleted it)."""
    if not seeded.storage.exists("uploads", seeded.owner(USER), "keep", "me.txt"):
        put = seeded.call(USER, "PUT", "/api/v1/files/keep/me.txt", content=b"kept")
        assert put.status_code == 201, put.text
    return seeded


def send(apis: LocalApis, request: dict[str, Any]) -> Any:
    request = dict(request)
    auth = request.pop("auth")
    headers = {"Authorization": "Bearer not.a.token"} if auth == "bad" else {}
    if auth == "none":
        headers = {"Authorization": ""}
    return apis.call(USER, request.pop("method"), request.pop("url"), headers=headers, **request)


def check_answer(request: dict[str, Any], answer: Any) -> None:
    where = f"{request['method']} {request['url']} {answer.status_code}: {answer.text[:300]}"
    assert answer.status_code < 500 or answer.status_code in ALLOWED_5XX, where
    if answer.status_code >= 400:
        body = answer.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), where


FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure is reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OPERATIONS = [
    pytest.param(op, id=f"{op['method']} {op['path']}")
    for document, prefix in DOCUMENTS.items()
    for op in operations(document, prefix)
]


@pytest.mark.parametrize("op", OPERATIONS)
def test_every_awkward_path_value_is_answered_without_a_500(fuzzed: LocalApis, op: dict[str, Any]):
    for value in AWKWARD if path_names(op) else [""]:
        request = {
            "method": op["method"],
            "url": with_path_values(op, dict.fromkeys(path_names(op), value)),
            "auth": "good",
        }
        check_answer(request, send(fuzzed, request))


@pytest.mark.parametrize("op", OPERATIONS)
def test_every_route_answers_any_request_without_a_500(fuzzed: LocalApis, op: dict[str, Any]):
    @FUZZ
    @given(request=requests(op))
    def fuzz(request: dict[str, Any]) -> None:
        check_answer(request, send(fuzzed, request))

    fuzz()


def test_the_fuzzed_documents_cover_every_route_of_the_apps(local_apis: LocalApis):
    """The documents the fuzz tests read list each route the apps serve."""
    documented = {
        (op["method"], op["path"])
        for document, prefix in DOCUMENTS.items()
        for op in operations(document, prefix)
    }
    served = set()
    for prefix, app in local_apis.apps.items():
        for route in app.routes:
            if getattr(route, "include_in_schema", False):
                for method in route.methods - {"HEAD"}:
                    served.add((method, prefix + route.path.replace(":path", "")))
    assert served <= documented, served - documented
