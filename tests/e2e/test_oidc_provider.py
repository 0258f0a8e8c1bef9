"""A pipeline through the MLaaS4HEP server's curl sequence with tokens of a real OIDC provider.

The upload carries MLaaS4HEP's own workflow-recipe ``params.json`` unchanged.

The provider is panva's ``oidc-provider`` (npm) on loopback; the platform trusts it as
``MLAAS4HEP_OIDC_ISSUER`` and knows nothing else of it: keys come from its discovery and
JWKS. Clients get access tokens by the client_credentials grant. The provider rotates
its signing key while the pipeline runs, and the platform follows. One training run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from auth_fixtures import token_parts
from mlaas4hep_examples import mlaas4hep_example
from oidc_fixtures import OIDCProvider, api_settings, serve_apis

from mlaas4hep.cli.quickstart import DEMO_MODEL

pytestmark = pytest.mark.e2e


def _folder_tarball(tmp_path: Path) -> bytes:
    """The MLaaS4HEP server's upload: a gzip tarball of one folder with MLaaS4HEP's own
    workflow-recipe params.json unchanged, files.txt and labels.txt naming the ROOT files
    in the folder, the model file and the ROOT files."""
    from mlaas4hep.cli.demo import write_demo_data

    folder = mlaas4hep_example(tmp_path, "recipe", files=["signal.root", "background.root"])
    write_demo_data(folder, events=600, seed=7)
    (folder / "ex_keras_model.py").write_text(DEMO_MODEL)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="folder_to_upload")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def platform(ray_cluster, platform_settings, oidc_provider: OIDCProvider, tmp_path_factory):
    """The pipeline and MLaaS4HEP server APIs trusting only the provider, on loopback."""
    settings = api_settings(platform_settings, oidc_provider.issuer)
    server = serve_apis(settings, tmp_path_factory.mktemp("apis"))
    yield server
    server.stop()


def _get(url: str, token: str, **kwargs) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kwargs)


def test_mlaas4hep_server_curl_sequence_with_provider_tokens_and_key_rotation(
    platform, oidc_provider, tmp_path
):
    url = platform.base_url + "/mlaas4hep"
    token = oidc_provider.token("alice")
    assert token_parts(token)[0]["kid"] == "key-1"
    auth = {"Authorization": f"Bearer {token}"}

    # curl -F "file=@folder_to_upload.tar.gz" .../upload?name=luca
    files = {"file": ("folder_to_upload.tar.gz", _folder_tarball(tmp_path), "application/gzip")}
    answer = httpx.post(f"{url}/upload", params={"name": "luca"}, files=files, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.text == "Successfully uploaded!\n"

    # curl -H "Content-Type: application/json" -d @submit.json .../submit
    submission = {
        "name": "luca",
        "device": "cpu",
        "memory": "3gb",
        "cpus": "2",
        "files": "files.txt",
        "labels": "labels.txt",
        "model": "ex_keras_model.py",
        "params": "params.json",
    }
    answer = httpx.post(f"{url}/submit", json=submission, headers=auth, timeout=120)
    assert answer.status_code == 200, answer.text
    process = answer.json()
    assert process["process_name"] == "luca_1" and process["job_id"].startswith("run-")

    # Another user of the same provider does not see alice's process.
    bob = oidc_provider.token("bob")
    hidden = _get(f"{url}/status_docker", bob, params={"process_name": "luca_1"})
    assert hidden.status_code == 404
    assert hidden.json() == {"error": "process 'luca_1' not found"}

    # The provider rotates its signing key while the pipeline runs.
    new_kid = oidc_provider.rotate()
    assert new_kid == "key-2"

    # curl .../status_docker?process_name=luca_1
    status = _get(f"{url}/status_docker", token, params={"process_name": "luca_1"}).json()
    assert status["id"] == process["job_id"]
    assert status["status"] == "Created" or status["status"].startswith("Up ")

    # Follow the log as it grows until the pipeline ends (one streamed answer).
    run_url = f"{platform.base_url}/api/v1/pipelines/{process['job_id']}"
    timeout = httpx.Timeout(60, read=900)
    with httpx.stream(
        "GET", run_url + "/logs", params={"follow": "true"}, headers=auth, timeout=timeout
    ) as stream:
        assert stream.status_code == 200
        followed = "".join(stream.iter_text())
    status = _get(f"{url}/status_docker", token, params={"process_name": "luca_1"}).json()
    assert status["status"] == "Exited (0)", status
    assert followed

    # Tokens signed with the new key are accepted: the platform fetched the new JWKS.
    rotated = oidc_provider.token("alice")
    assert token_parts(rotated)[0]["kid"] == "key-2"

    # curl -o logs.txt .../logs?process_name=luca_1
    logs = _get(f"{url}/logs", rotated, params={"process_name": "luca_1"})
    assert logs.status_code == 200, logs.text
    assert "registered luca_1 version 1" in logs.text
    assert "spec keys accepted and ignored: MLaaS4HEP keys with no use here: hist" in logs.text
    assert "training on " in logs.text and "num_workers not set" in logs.text
    assert logs.text.startswith(followed)
    assert "luca_1.txt" in logs.headers["content-disposition"]

    # curl -o luca_1.tar.gz .../model?process_name=luca_1
    model = _get(f"{url}/model", rotated, params={"process_name": "luca_1"})
    assert model.status_code == 200, model.text
    with tarfile.open(fileobj=io.BytesIO(model.content), mode="r:gz") as tar:
        names = tar.getnames()
    assert "params.json" in names and "specs.json" in names

    # The same run through the pipeline API, and the bundle route gives the same files.
    record = _get(run_url, rotated).json()
    assert record["state"] == "SUCCEEDED" and record["model"] == {"name": "luca_1", "version": 1}
    bundle = _get(f"{platform.base_url}/api/v1/models/luca_1/versions/1/bundle", rotated)
    with tarfile.open(fileobj=io.BytesIO(bundle.content), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(names)
    assert _get(f"{platform.base_url}/api/v1/models/luca_1", bob).status_code == 404

    # curl .../delete_specs?name=luca, then .../delete_folder?name=luca
    assert _get(f"{url}/delete_specs", rotated, params={"name": "luca"}).text == (
        "Specs deletion completed!\n"
    )
    assert (
        not _get(f"{platform.base_url}/api/v1/pipelines/{process['job_id']}/artifacts", rotated)
        .json()["artifacts"]
        .count("specs.json")
    )
    assert _get(f"{url}/delete_folder", rotated, params={"name": "luca"}).text == (
        "Folder deletion completed!\n"
    )
    assert _get(f"{platform.base_url}/api/v1/files", rotated).json()["files"] == []
    gone = _get(f"{platform.base_url}/api/v1/pipelines/{process['job_id']}", rotated)
    assert gone.status_code == 404


def test_provider_token_without_the_submit_scope_is_forbidden_to_submit(platform, oidc_provider):
    token = oidc_provider.token("alice", scope="openid")
    answer = httpx.post(
        f"{platform.base_url}/mlaas4hep/submit",
        json={"name": "x", "files": "f", "model": "m", "params": "p"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 403, answer.text
    assert "mlaas4hep.submit" in answer.json()["error"]
    assert token not in answer.text


def test_provider_groups_claim_makes_an_administrator(platform, oidc_provider):
    whoami = _get(f"{platform.base_url}/api/v1/whoami", oidc_provider.token("carol")).json()
    assert whoami["admin"] is True and whoami["issuer"] == oidc_provider.issuer
    assert whoami["sub"] == "carol"


def test_login_saves_a_provider_token_from_a_variable_for_the_client(
    platform, oidc_provider, tmp_path
):
    import subprocess
    import sys

    env = {**os.environ, "MLAAS4HEP_HOME": str(tmp_path), "OIDC_AT": oidc_provider.token("bob")}
    run = subprocess.run(
        [sys.executable, "-m", "mlaas4hep", "login", "--from-env", "OIDC_AT"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "token").read_text().strip() == env["OIDC_AT"]
    assert oct((tmp_path / "token").stat().st_mode & 0o777) == "0o600"
    whoami = _get(f"{platform.base_url}/api/v1/whoami", (tmp_path / "token").read_text().strip())
    assert whoami.json()["sub"] == "bob"
    refused = subprocess.run(
        [sys.executable, "-m", "mlaas4hep", "login", "--from-env", "NO_SUCH_VARIABLE"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "NO_SUCH_VARIABLE is empty or unset" in refused.stderr


def test_device_login_polls_the_provider_until_approval_times_out(oidc_provider):
    from mlaas4hep.cli.client import ClientError, device_login

    shown: list[dict] = []
    with pytest.raises(ClientError, match="not approved within 1 s"):
        device_login(
            oidc_provider.issuer,
            "alice",
            oidc_provider.secrets["alice"],
            show=shown.append,
            timeout=1,
        )
    assert shown[0]["verification_uri"] == oidc_provider.issuer + "/device"
    assert shown[0]["user_code"]


def test_login_by_the_device_grant_saves_the_users_token(platform, oidc_provider, tmp_path):
    """The CLI asks the provider for a device code and polls; the user signs in as 'dana'
    on the provider's own pages; the saved token is dana's and the platform accepts it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "mlaas4hep", "login", "--issuer", oidc_provider.issuer]
    command += ["--client-id", "alice", "--client-secret=" + oidc_provider.secrets["alice"]]
    command += ["--resource", "urn:mlaas4hep"]
    env = {**os.environ, "MLAAS4HEP_HOME": str(tmp_path)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as login:
        prompt = login.stdout.readline()
        assert prompt.startswith("open " + oidc_provider.issuer + "/device?user_code=")
        oidc_provider.approve_device(prompt.split()[1], "dana")
        assert login.wait(timeout=60) == 0
        assert "token saved to" in login.stdout.read()
    whoami = _get(f"{platform.base_url}/api/v1/whoami", (tmp_path / "token").read_text().strip())
    assert whoami.status_code == 200, whoami.text
    assert whoami.json()["sub"] == "dana"
    assert "mlaas4hep.submit" in whoami.json()["scopes"]


def test_multipart_submission_with_data_files_cancel_and_delete_leave_nothing(
    platform, platform_settings, oidc_provider, tmp_path
):
    from mlaas4hep.cli.demo import write_demo_data
    from mlaas4hep.pipeline.jobs import PipelineJobs
    from mlaas4hep.store.storage import Storage

    signal, background = write_demo_data(tmp_path, events=300, seed=5)
    spec = (
        "name: multipart\nbranch: Events\nepochs: 50\n"
        "files: [{path: signal.root, label: 1}, {path: background.root, label: 0}]\n"
    )
    token = oidc_provider.token("alice")
    parts = [
        ("spec", ("spec.yaml", spec.encode())),
        ("model", ("model.py", DEMO_MODEL.encode())),
        ("data", ("signal.root", signal.read_bytes())),
        ("data", ("background.root", background.read_bytes())),
    ]
    api = f"{platform.base_url}/api/v1/pipelines"
    auth = {"Authorization": f"Bearer {token}"}
    answer = httpx.post(f"{api}/upload", files=parts, headers=auth, timeout=120)
    assert answer.status_code == 201, answer.text
    run_id = answer.json()["id"]
    storage = Storage(platform_settings.storage)
    assert storage.listdir("runs", run_id, "inputs") == ["background.root", "signal.root"]
    spec_json = json.loads(storage.read_text("runs", run_id, "spec.json"))
    assert spec_json["files"][0]["path"] == storage.uri("runs", run_id, "inputs", "signal.root")

    cancelled = httpx.post(f"{api}/{run_id}/cancel", headers=auth, timeout=60)
    assert cancelled.json()["state"] == "CANCELLED"
    for _ in range(60):
        deleted = httpx.delete(f"{api}/{run_id}", headers=auth, timeout=60)
        if deleted.status_code != 409:
            break
        time.sleep(1)
    assert deleted.json() == {"deleted": run_id}
    assert not storage.exists("runs", run_id)
    assert PipelineJobs(platform_settings.jobs_url).view(run_id) is None
