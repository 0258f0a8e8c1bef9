"""Request bodies bounded while they stream, and a quota that counts everything a user stores.

The platform's own Serve apps (pipeline API, MLaaS4HEP server API, TFaaS + KServe, issuer)
run on the session's cluster with small limits, behind HAProxy as ``make run`` serves
them. Their replicas keep temporary files in a folder of this module (``TMPDIR``), which
must stay empty, and their storage must hold nothing of a refused request.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.ray

UPLOAD_LIMIT = 60_000
REQUEST_LIMIT = 50_000
QUOTA = 120_000
BOUNDARY = "mlaas4hep-limits"
API, SERVER, TFAAS = "/limits-api", "/limits-mlaas4hep", "/limits-tfaas"


# --------------------------------------------------------------------------- fixtures


class Apps:
    """The deployed apps, their replicas' temporary folder and their storage."""

    def __init__(self, url: str, tmp: Path, settings: Any, issuer: Any) -> None:
        self.url = url
        self.tmp = tmp
        self.settings = settings
        self.issuer = issuer

    @property
    def storage(self) -> Any:
        from mlaas4hep.store.storage import Storage

        return Storage(self.settings.storage)

    def owner(self, sub: str) -> str:
        from mlaas4hep.auth.oidc import owner_id

        return owner_id(sub, self.issuer.issuer_url)

    def call(self, sub: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.issuer.mint(sub)}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def temporary_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*"))

    def stored_files(self) -> list[str]:
        """Every file of the storage but the bookkeeping of the quota ledger and the
        registry's change stamp."""
        root = Path(self.settings.storage)
        names = (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return sorted(n for n in names if not n.startswith(".quota/") and n != "models/.stamp")


@pytest.fixture(scope="module")
def apps(serve_url, platform_settings, tmp_path_factory) -> Iterator[Apps]:
    from ray import serve

    from mlaas4hep.auth.issuer import LocalIssuer
    from mlaas4hep.serve.apps.inference import TFaaSIngress
    from mlaas4hep.serve.apps.issuer_app import (
        ISSUER_APP_NAME,
        ISSUER_ROUTE_PREFIX,
        build_issuer_app,
    )
    from mlaas4hep.serve.apps.mlaas4hep_server import MLaaS4HEPServerAPI
    from mlaas4hep.serve.apps.pipeline_api import PipelineAPI
    from mlaas4hep.serve.dataplane import TFaaSOptions

    tmp = tmp_path_factory.mktemp("replica-tmp")
    settings = platform_settings.model_copy(
        update={
            "storage": str(tmp_path_factory.mktemp("limits-storage")),
            "max_upload_bytes": UPLOAD_LIMIT,
            "max_request_bytes": REQUEST_LIMIT,
            "user_quota_bytes": QUOTA,
            # No cluster takes the pipelines: a submission is recorded, then answers 503.
            "dashboard_url": f"http://127.0.0.1:{free_port()}",
            "grpc_port": 0,  # the session's gRPC port belongs to the session's TFaaS app
        }
    )
    actor = {"num_cpus": 0.05, "runtime_env": {"env_vars": {"TMPDIR": str(tmp)}}}
    api = PipelineAPI.options(num_replicas=2, autoscaling_config=None, ray_actor_options=actor)
    server = MLaaS4HEPServerAPI.options(ray_actor_options=actor)
    options = TFaaSOptions(max_upload_bytes=UPLOAD_LIMIT, direct_max_rows=0)
    ingress = serve.deployment(TFaaSIngress, name="TFaaSIngress", ray_actor_options=actor)
    # In one call: the replicas of the four apps start together.
    serve.run_many(
        [
            serve.RunTarget(build_issuer_app(platform_settings), name=ISSUER_APP_NAME,
                            route_prefix=ISSUER_ROUTE_PREFIX),
            serve.RunTarget(api.bind(settings), name="limits-api", route_prefix=API),
            serve.RunTarget(server.bind(settings), name="limits-mlaas4hep", route_prefix=SERVER),
            serve.RunTarget(ingress.bind(settings, options, None), name="limits-tfaas",
                            route_prefix=TFAAS),
        ]
    )  # fmt: skip
    issuer = LocalIssuer(
        platform_settings.issuer_key_dir,
        platform_settings.builtin_issuer_url,
        platform_settings.oidc_audience,
    )
    yield Apps(serve_url, tmp, settings, issuer)
    for name in ("limits-api", "limits-mlaas4hep", "limits-tfaas"):
        serve.delete(name)


# --------------------------------------------------------------------------- bodies


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of ``(field, filename or None, content)`` parts."""
    out = io.BytesIO()
    for field, filename, content in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.write(content + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def chunked(data: bytes, size: int = 16_384) -> Iterator[bytes]:
    """``data`` as a body without Content-Length (sent chunked)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
BIG = b"\x00" * 400_000
SPEC = b"name: big\nfiles: [{path: big.root, label: 1}]\nbranch: Events\n"
PARAMS = json.dumps({"name": "big", "model": "model.keras"}).encode()


def big_tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:  # not compressed: stays big
        info = tarfile.TarInfo("big/blob.bin")
        info.size = len(BIG)
        archive.addfile(info, io.BytesIO(BIG))
    return buffer.getvalue()


def middleware_refusal(method: str, path: str, limit: int) -> dict[str, str]:
    return {"error": f"{method} {path}: request body over the limit of {limit} bytes"}


UPLOAD_BODY_LIMIT = UPLOAD_LIMIT + 64 * 1024  # the framing room of multipart uploads

UPLOAD_ROUTES = [
    pytest.param(
        "PUT", f"{API}/files/big.bin", {}, BIG,
        middleware_refusal("PUT", "/files/big.bin", UPLOAD_LIMIT), id="api-put-file",
    ),
    pytest.param(
        "POST", f"{API}/files", FORM, multipart(("file", "big.bin", BIG)),
        middleware_refusal("POST", "/files", UPLOAD_BODY_LIMIT), id="api-post-files",
    ),
    pytest.param(
        "POST", f"{API}/pipelines/upload", FORM,
        multipart(("spec", "spec.yaml", SPEC), ("data", "big.root", BIG)),
        middleware_refusal("POST", "/pipelines/upload", UPLOAD_BODY_LIMIT),
        id="api-multipart-submission",
    ),
    pytest.param(
        "POST", f"{SERVER}/upload?name=luca", FORM,
        multipart(("file", "luca.tar", big_tarball())),
        middleware_refusal("POST", "/upload", UPLOAD_BODY_LIMIT), id="mlaas4hep-upload",
    ),
    pytest.param(
        "POST", f"{TFAAS}/upload", FORM,
        multipart(("name", None, b"big"), ("params", "params.json", PARAMS),
                  ("model", "model.keras", BIG)),
        middleware_refusal("POST", "/upload", UPLOAD_BODY_LIMIT), id="tfaas-upload",
    ),
    pytest.param(
        "POST", f"{TFAAS}/bundle", {}, big_tarball(),
        middleware_refusal("POST", "/bundle", UPLOAD_BODY_LIMIT), id="tfaas-bundle",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "headers", "body", "refusal"), UPLOAD_ROUTES)
def test_chunked_body_over_the_limit_on_every_upload_route_gets_413_and_leaves_nothing(
    apps, method, path, headers, body, refusal
):
    answer = apps.call("uma", method, path, headers=headers, content=chunked(body))
    assert answer.status_code == 413, answer.text
    assert answer.json() == refusal
    assert apps.temporary_files() == []
    assert apps.stored_files() == []


def oversized_json() -> bytes:
    values = [0.125] * (REQUEST_LIMIT // 4)
    return json.dumps({"keys": [], "values": values, "model": "m"}).encode()


REQUEST_ROUTES = [
    pytest.param(f"{TFAAS}/json", "/json", {}, id="tfaas-json"),
    pytest.param(f"{TFAAS}/predict/json", "/predict/json", {}, id="tfaas-predict-json"),
    pytest.param(f"{TFAAS}/events", "/events", {}, id="tfaas-events"),
    pytest.param(f"{TFAAS}/proto", "/proto", {}, id="tfaas-proto"),
    pytest.param(f"{TFAAS}/image", "/image", FORM, id="tfaas-image"),
    pytest.param(f"{TFAAS}/v2/models/m/infer", "/v2/models/m/infer", {}, id="kserve-infer"),
    pytest.param(
        f"{TFAAS}/v2/models/m/versions/1/infer", "/v2/models/m/versions/1/infer", {},
        id="kserve-version-infer",
    ),
    pytest.param(f"{API}/pipelines", "/pipelines", {}, id="api-json-submission"),
    pytest.param(f"{SERVER}/submit", "/submit", {}, id="mlaas4hep-submit"),
]  # fmt: skip


@pytest.mark.parametrize("streamed", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize(("path", "route", "headers"), REQUEST_ROUTES)
def test_oversized_prediction_and_api_bodies_get_413(apps, path, route, headers, streamed):
    body = oversized_json()
    content = chunked(body) if streamed else body
    answer = apps.call("uma", "POST", path, headers=headers, content=content)
    assert answer.status_code == 413, answer.text
    assert answer.json() == middleware_refusal("POST", route, REQUEST_LIMIT)
    assert apps.temporary_files() == []
    assert apps.stored_files() == []


def test_the_issuer_takes_no_body(apps):
    answer = httpx.post(apps.url + "/issuer/jwks", content=b"x" * 100, timeout=30)
    assert answer.status_code == 413, answer.text
    assert answer.json() == middleware_refusal("POST", "/jwks", 0)


def test_bodies_within_the_limits_still_reach_the_routes(apps):
    small = apps.call("uma", "POST", f"{TFAAS}/json", json={"values": [1.0], "model": "none"})
    assert small.status_code == 404, small.text  # the route ran: no such model
    put = apps.call("uma", "PUT", f"{API}/files/ok.bin", content=chunked(b"o" * 40_000, 1000))
    assert put.status_code == 201, put.text
    assert apps.call("uma", "DELETE", f"{API}/files/ok.bin").status_code == 200
    assert apps.stored_files() == []


# --------------------------------------------------------------------------- quota


def put_file(apps: Apps, sub: str, name: str, size: int) -> httpx.Response:
    return apps.call(sub, "PUT", f"{API}/files/{name}", content=b"q" * size)


def test_multipart_data_parts_count_toward_the_quota(apps, tmp_path):
    from mlaas4hep.cli.demo import write_demo_data

    signal, background = write_demo_data(tmp_path, events=50, seed=3)
    spec = (
        "name: quota\nbranch: Events\n"
        "files: [{path: signal.root, label: 1}, {path: background.root, label: 0}]\n"
    )
    body = multipart(
        ("spec", "spec.yaml", spec.encode()),
        ("data", "signal.root", signal.read_bytes()),
        ("data", "background.root", background.read_bytes()),
    )
    first = apps.call("vera", "POST", f"{API}/pipelines/upload", headers=FORM, content=body)
    assert first.status_code == 503, first.text  # recorded, with its inputs; no cluster
    parts = signal.stat().st_size + background.stat().st_size
    used = apps.call("vera", "GET", f"{API}/files").json()["used_bytes"]
    assert parts <= used < QUOTA
    second = apps.call("vera", "POST", f"{API}/pipelines/upload", headers=FORM, content=body)
    assert second.status_code == 413, second.text
    assert "quota of 120000 bytes" in second.json()["error"]
    runs = [r for r in apps.storage.listdir("runs")]
    assert len(runs) == 1  # the refused submission left no run behind
    refused = put_file(apps, "vera", "more.bin", QUOTA - used + 1)
    assert refused.status_code == 413, refused.text
    apps.storage.delete("runs", runs[0])
    assert apps.stored_files() == ["models/quota/model.json"]  # the name stays reserved
    apps.storage.delete("models", "quota")
    assert apps.stored_files() == []


def _stored_run(apps: Apps, owner: str) -> tuple[str, ...]:
    from mlaas4hep.store.runs import RunStore, new_run_id

    run_id = new_run_id()
    RunStore(apps.storage).create(run_id, owner=owner, name="big", state="SUCCEEDED")
    apps.storage.write_bytes(b"c" * 100_000, "runs", run_id, "train", "checkpoint.bin")
    return ("runs", run_id)


def _stored_model(apps: Apps, owner: str, tmp_path: Path) -> tuple[str, ...]:
    from mlaas4hep.store.registry import ModelRegistry

    (tmp_path / "params.json").write_text(json.dumps({"model": "model.keras"}))
    (tmp_path / "model.keras").write_bytes(b"w" * 100_000)
    ModelRegistry(apps.storage).register("quota-model", tmp_path, owner)
    return ("models", "quota-model")


def _stored_prediction(apps: Apps, owner: str) -> tuple[str, ...]:
    folder = ("predictions", "pred-20261203-120000-abcdef")
    apps.storage.write_json({"owner": owner}, *folder, "request.json")
    apps.storage.write_bytes(b"s" * 100_000, *folder, "scores", "part-0.parquet")
    return folder


@pytest.mark.parametrize("kind", ["run artifacts", "model versions", "prediction outputs"])
def test_what_a_users_work_stores_counts_toward_the_quota(apps, kind, tmp_path):
    owner = apps.owner("walt")
    stored = {
        "run artifacts": lambda: _stored_run(apps, owner),
        "model versions": lambda: _stored_model(apps, owner, tmp_path),
        "prediction outputs": lambda: _stored_prediction(apps, owner),
    }[kind]()
    refused = put_file(apps, "walt", "file.bin", 30_000)
    assert refused.status_code == 413, refused.text
    assert "quota of 120000 bytes" in refused.json()["error"]
    assert put_file(apps, "someone-else", "file.bin", 30_000).status_code == 201
    apps.storage.delete(*stored)
    assert put_file(apps, "walt", "file.bin", 30_000).status_code == 201
    for sub in ("walt", "someone-else"):
        assert apps.call(sub, "DELETE", f"{API}/files/file.bin").status_code == 200
    assert apps.stored_files() == []


def test_a_full_quota_refuses_new_submissions(apps):
    assert put_file(apps, "xena", "a.bin", 59_000).status_code == 201
    assert put_file(apps, "xena", "b.bin", 59_000).status_code == 201
    spec = {"name": "full", "files": [{"path": "a.bin", "label": 1}], "branch": "Events"}
    answer = apps.call("xena", "POST", f"{API}/pipelines", json={"spec": spec})
    assert answer.status_code == 413, answer.text  # before its inputs are even opened
    assert "quota of 120000 bytes" in answer.json()["error"]
    for name in ("a.bin", "b.bin"):
        apps.call("xena", "DELETE", f"{API}/files/{name}")
    assert apps.stored_files() == []


@pytest.mark.parametrize("streamed", [True, False], ids=["chunked", "content-length"])
def test_concurrent_uploads_cannot_pass_the_quota_together(apps, streamed):
    size, count = 30_000, 6  # 4 fit the quota of 120000 bytes
    start = threading.Barrier(count)

    def body() -> Iterator[bytes]:
        yield b"u" * 1000
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(timeout=30)  # every upload has begun before any ends
        yield from chunked(b"u" * (size - 1000), 2000)

    def upload(index: int) -> httpx.Response:
        headers = {} if streamed else {"Content-Length": str(size)}
        return apps.call("yuri", "PUT", f"{API}/files/f{index}.bin", headers=headers,
                         content=body())  # fmt: skip

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(upload, range(count)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {201, 413}, [a.text for a in answers]
    assert statuses.count(201) <= QUOTA // size
    listing = apps.call("yuri", "GET", f"{API}/files").json()
    assert listing["used_bytes"] == sum(f["size"] for f in listing["files"]) <= QUOTA
    assert len(listing["files"]) == statuses.count(201)
    for entry in listing["files"]:
        apps.call("yuri", "DELETE", f"{API}/files/{entry['path']}")
    assert apps.stored_files() == []


def test_a_run_whose_model_would_pass_the_quota_fails_with_a_clear_message(tmp_path):
    from mlaas4hep.store.quota import QuotaExceeded, check_run_outputs
    from mlaas4hep.store.runs import RunStore, new_run_id
    from mlaas4hep.store.storage import Storage

    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    RunStore(storage).create(run_id, owner="zoe", name="m", quota_bytes=10_000)
    storage.write_bytes(b"c" * 6_000, "runs", run_id, "train", "checkpoint.bin")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.keras").write_bytes(b"w" * 3_000)
    check_run_outputs(storage, run_id, "zoe", bundle)  # fits: 6000 + record + 3000
    (bundle / "model.keras").write_bytes(b"w" * 5_000)
    with pytest.raises(QuotaExceeded, match="storage quota of 10000 bytes"):
        check_run_outputs(storage, run_id, "zoe", bundle)


@pytest.mark.parametrize("ledger", ["file lock", "ray actor"])
def test_concurrent_writers_cannot_pass_the_quota_through_either_ledger(
    ledger, ray_cluster, tmp_path
):
    import ray

    from mlaas4hep.store.quota import ActorLedger, Quota, QuotaExceeded, owner_usage
    from mlaas4hep.store.storage import Storage

    storage = Storage(str(tmp_path / "storage"))
    book = ActorLedger(storage) if ledger == "ray actor" else None
    quota = Quota(storage, "ivy", 100_000, ledger=book)
    start = threading.Barrier(8)

    def write(index: int) -> bool:
        start.wait(timeout=60)
        try:
            with quota.reservation() as held:
                held.take(30_000, 30_000)
                name = f"f{index}.bin"
                held.commit(lambda: storage.write_bytes(b"i" * 30_000, "uploads", "ivy", name))
        except QuotaExceeded:
            return False
        return True

    try:
        with ThreadPoolExecutor(8) as pool:
            written = list(pool.map(write, range(8)))
        # 3 x 30000 fit 100000, a fourth does not. The actor frees a writer's room just
        # after its write, so a concurrent one may be refused while both count.
        fitting = written.count(True)
        assert fitting == 3 if ledger == "file lock" else 1 <= fitting <= 3
        assert owner_usage(storage, "ivy") == 30_000 * fitting
    finally:
        if book is not None:
            ray.kill(ray.get_actor(book.actor_name, namespace="mlaas4hep"))
