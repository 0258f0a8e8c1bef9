"""Files, quotas, limits and tenancy of the pipeline API, with tokens of a real OIDC provider.

No training here: refusals happen before a Ray Job would start, and finished runs are
recorded directly in the module's own storage.
"""

import io
import json
import tarfile

import httpx
import pytest
from oidc_fixtures import OIDCProvider, api_settings, serve_apis
from serve_fixtures import tarball

from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunState, RunStore, new_run_id
from mlaas4hep.store.storage import Storage

QUOTA = 4000
FILE_LIMIT = 3000


@pytest.fixture(scope="module")
def api(platform_settings, oidc_provider: OIDCProvider, tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("tenancy-storage"))
    settings = api_settings(
        platform_settings,
        oidc_provider.issuer,
        storage=storage,
        max_upload_bytes=FILE_LIMIT,
        user_quota_bytes=QUOTA,
        max_active_pipelines=1,
        max_workers_per_pipeline=2,
    )
    server = serve_apis(settings, tmp_path_factory.mktemp("apis"))
    yield server, Storage(storage)
    server.stop()


@pytest.fixture(scope="module")
def tokens(oidc_provider):
    return {user: oidc_provider.token(user) for user in ("alice", "bob", "carol")}


def call(api, tokens, user, method, path, **kwargs) -> httpx.Response:
    server, _ = api
    headers = {"Authorization": f"Bearer {tokens[user]}"}
    return httpx.request(method, server.base_url + path, headers=headers, timeout=30, **kwargs)


def uploads_left(storage: Storage) -> list[str]:
    return [str(p) for p in (storage.fs.find(storage.path("uploads")) or [])]


def test_files_upload_list_download_delete(api, tokens):
    put = call(api, tokens, "alice", "PUT", "/api/v1/files/data/a.txt", content=b"x" * 100)
    assert put.status_code == 201, put.text
    form = call(api, tokens, "alice", "POST", "/api/v1/files", files={"file": ("b.txt", b"yy")})
    assert form.status_code == 201, form.text
    listing = call(api, tokens, "alice", "GET", "/api/v1/files").json()
    assert listing["files"] == [{"path": "b.txt", "size": 2}, {"path": "data/a.txt", "size": 100}]
    assert listing["used_bytes"] == 102 and listing["quota_bytes"] == QUOTA
    assert call(api, tokens, "alice", "GET", "/api/v1/files/b.txt").content == b"yy"
    # Another user's file does not exist for them.
    assert call(api, tokens, "bob", "GET", "/api/v1/files/b.txt").status_code == 404
    assert call(api, tokens, "bob", "GET", "/api/v1/files").json()["files"] == []
    for path in ("b.txt", "data"):
        assert call(api, tokens, "alice", "DELETE", f"/api/v1/files/{path}").status_code == 200
    assert call(api, tokens, "alice", "GET", "/api/v1/files").json()["files"] == []


def test_file_over_the_size_limit_is_refused_and_leaves_nothing(api, tokens):
    _, storage = api
    answer = call(api, tokens, "alice", "PUT", "/api/v1/files/big.bin", content=b"z" * 3001)
    assert answer.status_code == 413
    refusal = "PUT /files/big.bin: request body over the limit of 3000 bytes"
    assert answer.json() == {"error": refusal}

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(4):
            yield b"z" * 1000

    answer = call(api, tokens, "alice", "PUT", "/api/v1/files/big.bin", content=chunks())
    assert answer.status_code == 413, answer.text
    assert uploads_left(storage) == []


def test_upload_over_the_quota_is_refused_and_leaves_nothing_new(api, tokens):
    _, storage = api
    for name in ("one.bin", "two.bin"):
        answer = call(api, tokens, "bob", "PUT", f"/api/v1/files/{name}", content=b"q" * 1800)
        assert answer.status_code == 201, answer.text
    answer = call(
        api, tokens, "bob", "POST", "/api/v1/files", files={"file": ("3.bin", b"q" * 500)}
    )
    assert answer.status_code == 413
    assert answer.json()["error"] == (
        "3.bin: the upload does not fit your quota of 4000 bytes (3600 bytes used); "
        "delete files first"
    )
    listing = call(api, tokens, "bob", "GET", "/api/v1/files").json()
    assert [f["path"] for f in listing["files"]] == ["one.bin", "two.bin"]
    assert listing["used_bytes"] == 3600
    for name in ("one.bin", "two.bin"):
        call(api, tokens, "bob", "DELETE", f"/api/v1/files/{name}")
    assert uploads_left(storage) == []


@pytest.mark.parametrize(
    ("path", "message"), [("../x", "'..' is not allowed"), (".hidden", "'.hidden' is not allowed")]
)
def test_file_paths_leaving_the_users_space_are_refused(api, tokens, path, message):
    form = call(api, tokens, "alice", "POST", "/api/v1/files", data={"path": path},
                files={"file": ("f", b"1")})  # fmt: skip
    assert form.status_code == 400, form.text
    assert message in form.json()["error"]


@pytest.mark.parametrize(
    ("members", "status", "message"),
    [
        ({"f/../../escape.txt": b"1"}, 400, "leaves the bundle"),
        ({"f/a.bin": b"a" * 2500, "f/b.bin": b"b" * 2500}, 413, "your quota is 4000 bytes"),
    ],
)
def test_mlaas4hep_upload_checks_paths_and_quota_and_leaves_nothing(
    api, tokens, members, status, message
):
    _, storage = api
    answer = call(
        api,
        tokens,
        "alice",
        "POST",
        "/mlaas4hep/upload",
        params={"name": "luca"},
        files={"file": ("f.tar.gz", tarball(members))},
    )
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert uploads_left(storage) == []


def test_mlaas4hep_names_are_the_callers_own(api, tokens):
    folder = tarball({"f/files.txt": b"a.root\n", "f/params.json": b"{}", "f/m.py": b""})
    ok = call(api, tokens, "alice", "POST", "/mlaas4hep/upload", params={"name": "luca"},
              files={"file": ("f.tar.gz", folder)})  # fmt: skip
    assert ok.text == "Successfully uploaded!\n"
    body = {"name": "luca", "files": "files.txt", "params": "params.json", "model": "m.py"}
    refused = call(api, tokens, "bob", "POST", "/mlaas4hep/submit", json=body)
    assert refused.status_code == 404
    assert refused.json() == {"error": "folder 'luca' not found: upload it first (/upload?name=)"}
    outside = call(api, tokens, "alice", "POST", "/mlaas4hep/submit",
                   json={**body, "files": "../../etc/passwd"})  # fmt: skip
    assert outside.status_code == 422
    assert "is not a file name inside the folder" in outside.json()["error"]
    assert call(api, tokens, "bob", "GET", "/mlaas4hep/delete_folder", params={"name": "luca"}
                ).status_code == 404  # fmt: skip
    gone = call(api, tokens, "alice", "GET", "/mlaas4hep/delete_folder", params={"name": "luca"})
    assert gone.text == "Folder deletion completed!\n"


def test_another_tenants_pipeline_answers_404_and_administrators_see_it(api, tokens):
    _, storage = api
    alice = call(api, tokens, "alice", "GET", "/api/v1/whoami").json()["owner"]
    run_id = new_run_id()
    RunStore(storage).create(run_id, owner=alice, name="higgs", state=RunState.SUCCEEDED.value)
    assert call(api, tokens, "alice", "GET", f"/api/v1/pipelines/{run_id}").status_code == 200
    for method, path in [("GET", ""), ("GET", "/logs"), ("GET", "/artifacts"), ("DELETE", "")]:
        answer = call(api, tokens, "bob", method, f"/api/v1/pipelines/{run_id}{path}")
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json() == {"error": f"pipeline {run_id!r} not found"}
    assert call(api, tokens, "bob", "GET", "/api/v1/pipelines").json() == {"pipelines": []}
    everyone = call(api, tokens, "carol", "GET", "/api/v1/pipelines").json()["pipelines"]
    assert [r["id"] for r in everyone] == [run_id]
    mine = call(api, tokens, "alice", "GET", "/api/v1/pipelines", params={"name": "other"})
    assert mine.json() == {"pipelines": []}
    refused = call(api, tokens, "bob", "GET", "/api/v1/pipelines", params={"owner": alice})
    assert refused.status_code == 403
    RunStore(storage).delete(run_id)


def test_model_visibility_is_set_by_its_owner_and_hides_private_models(api, tokens, tmp_path):
    _, storage = api
    alice = call(api, tokens, "alice", "GET", "/api/v1/whoami").json()["owner"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "params.json").write_text(json.dumps({"model": "model.keras", "format": "keras"}))
    (bundle / "model.keras").write_bytes(b"weights")
    ModelRegistry(storage).register("tenantmodel", bundle, alice)
    shown = call(api, tokens, "alice", "GET", "/api/v1/models/tenantmodel").json()
    assert shown["format"] == "keras"  # what `mlaas4hep models show` prints
    assert call(api, tokens, "bob", "GET", "/api/v1/models/tenantmodel").status_code == 404
    assert call(api, tokens, "bob", "GET", "/api/v1/models/tenantmodel/bundle").status_code == 404
    assert "tenantmodel" not in str(call(api, tokens, "bob", "GET", "/api/v1/models").json())
    public = {"visibility": "public"}
    answer = call(api, tokens, "bob", "PUT", "/api/v1/models/tenantmodel/visibility", json=public)
    assert answer.status_code == 404
    answer = call(api, tokens, "alice", "PUT", "/api/v1/models/tenantmodel/visibility", json=public)
    assert answer.json()["visibility"] == "public"
    bundle_answer = call(api, tokens, "bob", "GET", "/api/v1/models/tenantmodel/bundle")
    with tarfile.open(fileobj=io.BytesIO(bundle_answer.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["model.keras", "params.json"]
    answer = call(api, tokens, "bob", "PUT", "/api/v1/models/tenantmodel/visibility", json=public)
    assert answer.status_code == 403
    group = {"visibility": "group", "groups": ["/atlas"]}
    call(api, tokens, "alice", "PUT", "/api/v1/models/tenantmodel/visibility", json=group)
    assert call(api, tokens, "bob", "GET", "/api/v1/models/tenantmodel").status_code == 200
    ModelRegistry(storage).delete("tenantmodel")


def test_pipeline_asking_for_too_many_workers_or_pipelines_is_refused(api, tokens, tmp_path):
    from mlaas4hep.cli.demo import write_demo_data

    _, storage = api
    signal, background = write_demo_data(tmp_path, events=200, seed=3)
    spec = {
        "name": "limits",
        "files": [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}],
        "branch": "Events",
        "resources": {"num_workers": 3},
    }
    body = {"spec": spec, "model_source": None}
    answer = call(api, tokens, "alice", "POST", "/api/v1/pipelines", json=body)
    assert answer.status_code == 422
    assert answer.json() == {
        "error": "spec.resources.num_workers: the pipeline asks for 3 workers; "
        "at most 2 per pipeline"
    }
    alice = call(api, tokens, "alice", "GET", "/api/v1/whoami").json()["owner"]
    busy = new_run_id()
    RunStore(storage).create(busy, owner=alice, name="busy", state=RunState.SUCCEEDED.value)
    RunStore(storage).update(busy, only_if={RunState.SUCCEEDED}, state=RunState.RUNNING)
    spec["resources"] = {"num_workers": 1}
    answer = call(api, tokens, "alice", "POST", "/api/v1/pipelines", json=body)
    assert answer.status_code == 429
    assert "the limit is 1" in answer.json()["error"]
    RunStore(storage).delete(busy)
    assert storage.listdir("runs") == []


def test_multipart_submission_refused_leaves_no_run_behind(api, tokens):
    _, storage = api
    spec = "name: broken\nfiles: [{path: data.root, label: 1}]\nbranch: Events\n"
    answer = call(
        api,
        tokens,
        "alice",
        "POST",
        "/api/v1/pipelines/upload",
        files=[("spec", ("spec.yaml", spec.encode())), ("data", ("data.root", b"not root"))],
    )
    assert answer.status_code == 422, answer.text
    assert "data.root" in answer.json()["error"]
    assert "inputs/data.root" not in answer.json()["error"]
    assert storage.listdir("runs") == []


def test_submitted_model_code_is_parsed_never_run_in_the_api_process(api, tokens, tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('ran')\ndef model(idim):\n    return None\n"
    spec = {"name": "x", "files": [{"path": str(tmp_path / "none.root"), "label": 1}]}
    answer = call(
        api, tokens, "alice", "POST", "/api/v1/pipelines",
        json={"spec": spec, "model_source": source},
    )  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert "none.root" in answer.json()["error"]
    assert not marker.exists()


def test_tokens_never_reach_logs_or_error_messages(api, tokens, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    good = tokens["alice"]
    head, body, signature = good.split(".")
    tampered = f"{head}.{body[:-4]}AAAA.{signature}"
    answers = [
        call(api, tokens, "alice", "GET", "/api/v1/files"),
        call(api, {"x": tampered}, "x", "GET", "/api/v1/files"),
        call(api, {"x": good + "x"}, "x", "GET", "/mlaas4hep/status_docker?process_name=a"),
    ]
    assert [a.status_code for a in answers] == [200, 401, 401]
    for secret in (good, tampered, signature):
        assert secret not in caplog.text
        for answer in answers:
            assert secret not in answer.text
            assert secret not in answer.headers.get("www-authenticate", "")


def test_cli_covers_files_models_and_the_mlaas4hep_server_endpoints(api, tokens, tmp_path):
    import subprocess
    import sys

    server, _ = api
    local = tmp_path / "notes.txt"
    local.write_text("hello")

    def cli(*words: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mlaas4hep", *words, "--url", server.base_url]
        return subprocess.run(
            [*command, "--token", tokens["alice"]],
            capture_output=True, text=True, cwd=tmp_path, check=False,
        )  # fmt: skip

    assert cli("files", "put", str(local), "docs/notes.txt").returncode == 0
    listing = json.loads(cli("files", "ls").stdout)
    assert listing["files"] == [{"path": "docs/notes.txt", "size": 5}]
    assert cli("files", "get", "docs/notes.txt", "-o", "copy.txt").returncode == 0
    assert (tmp_path / "copy.txt").read_text() == "hello"
    assert json.loads(cli("files", "rm", "docs/notes.txt").stdout) == {"deleted": "docs/notes.txt"}
    assert json.loads(cli("whoami").stdout)["sub"] == "alice"
    assert json.loads(cli("models", "ls").stdout) == []
    missing = cli("server", "status_docker", "luca_9")
    assert missing.returncode == 1
    assert "404: process 'luca_9' not found" in missing.stderr
    assert tokens["alice"] not in missing.stderr
