"""End to end over HTTP, as `make run` does it: token, submit, Ray Job, train, serve, predict.

Runs against the session's platform: the head started by ``ray_cluster`` with every Serve
application deployed on it. Data are small so the two training runs stay short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlaas4hep_examples import NANOAOD, mlaas4hep_example

from mlaas4hep.auth.issuer import LocalIssuer, builtin_issuer
from mlaas4hep.auth.ray_token import ray_token
from mlaas4hep.cli.client import ClientError, PlatformClient
from mlaas4hep.cli.quickstart import DEMO_MODEL, predict_event, write_demo_inputs
from mlaas4hep.platform.cluster import ray_env

pytestmark = pytest.mark.e2e

#: Seconds between status reads while a test waits for a pipeline.
POLL = 0.5


@pytest.fixture(scope="module")
def platform(serve_url, platform_settings):
    """Every Serve application of the platform, deployed on the session's head; the ones
    this module added are deleted after it (idle replicas take CPU from later tests)."""
    from ray import serve

    from mlaas4hep.serve.apps.deploy import deploy

    before = set(serve.status().applications)
    with pytest.MonkeyPatch.context() as patch:  # one ingress replica: the suite's CPUs are few
        patch.setenv("MLAAS4HEP_TFAAS_INGRESS_MIN_REPLICAS", "1")
        deploy(platform_settings)
    yield platform_settings
    for name in set(serve.status().applications) - before:
        serve.delete(name)


@pytest.fixture(scope="module")
def issuer(platform) -> LocalIssuer:
    return builtin_issuer(platform)


@pytest.fixture(scope="module")
def client(platform, issuer):
    client = PlatformClient(platform.api_url, issuer.mint("alice"), timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def demo_spec(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    return write_demo_inputs(folder, events=600, epochs=2)


@pytest.fixture(scope="module")
def finished_run(client, demo_spec) -> dict:
    """The demo pipeline submitted over HTTP and followed to its end."""
    from mlaas4hep.spec import load_spec

    record = client.submit(load_spec(demo_spec))
    assert record["state"] == "PENDING"
    return client.wait(record["id"], poll=POLL, timeout=900)


def test_demo_pipeline_trains_registers_and_serves_a_model(client, finished_run, demo_spec):
    assert finished_run["state"] == "SUCCEEDED", finished_run.get("message")
    assert finished_run["model"] == {"name": "demo", "version": 1}
    assert 0.5 < finished_run["metrics"]["test_auc"] <= 1.0
    prediction, features = predict_event(
        client, finished_run["id"], "demo", demo_spec.parent / "signal.root", 0
    )
    assert len(prediction) == 1
    assert 0.0 <= float(prediction[0]) <= 1.0
    assert len(features) > 10


def test_pipeline_job_is_listed_by_the_jobs_api_with_its_owner(finished_run, platform):
    headers = {"Authorization": f"Bearer {ray_token()}"}
    jobs = httpx.get(f"{platform.jobs_url}/api/jobs/", headers=headers, timeout=30).json()
    ours = [job for job in jobs if job.get("submission_id") == finished_run["id"]]
    assert ours, "the pipeline's Ray job is not listed"
    assert ours[0]["metadata"]["owner"] == finished_run["owner"]
    assert ours[0]["metadata"]["run_id"] == finished_run["id"]


def test_finished_pipeline_exposes_logs_and_artifacts(client, finished_run):
    assert "registered demo version 1" in client.logs(finished_run["id"])
    specs = json.loads(client.artifact(finished_run["id"], "specs.json"))
    assert {"jdim", "minv", "maxv", "fkeys", "jkeys", "nans"} <= set(specs)
    names = set(client.artifacts(finished_run["id"]))
    plots = {f"plots/{n}.png" for n in ("roc", "scores", "confusion_matrix", "history")}
    assert {"metrics.json", "history.json"} | plots <= names
    response = client.http.get(f"/api/v1/pipelines/{finished_run['id']}/artifacts/plots/roc.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_pipeline_metrics_hold_auc_roc_and_confusion_matrix(client, finished_run):
    metrics = json.loads(client.artifact(finished_run["id"], "metrics.json"))
    assert metrics["auc"] == pytest.approx(finished_run["metrics"]["test_auc"])
    assert len(metrics["roc"]["fpr"]) == len(metrics["roc"]["tpr"]) > 2
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tn + fp + fn + tp == metrics["n"] > 0
    assert [row["epoch"] for row in metrics["history"]] == [0, 1]


def test_pipeline_progress_carries_train_and_validation_metrics(finished_run):
    progress = finished_run["progress"]
    assert progress["epoch"] == progress["epochs"] == 2
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(progress)
    assert not {"pid", "weights_sum", "rank"} & set(progress)


@pytest.mark.parametrize("path", ["/api/v1/pipelines", "/json"])
def test_requests_without_token_get_401_with_error(platform, path):
    method = "GET" if path.endswith("pipelines") else "POST"
    response = httpx.request(method, platform.api_url + path, json={}, timeout=30)
    assert response.status_code == 401
    assert "error" in response.json()


def test_expired_token_and_token_of_another_key_get_401(platform, issuer, tmp_path):
    expired = issuer.mint("alice", ttl=-3600)
    stranger = LocalIssuer(tmp_path / "other-key", issuer.issuer_url).mint("alice")
    for token in (expired, stranger):
        response = httpx.get(
            platform.api_url + "/api/v1/pipelines",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == 401, response.text
        assert "error" in response.json()


def test_token_from_the_cli_is_accepted(platform):
    token = subprocess.run(
        [sys.executable, "-m", "mlaas4hep", "token", "--user", "bob"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MLAAS4HEP_PORT": str(platform.port)},
    ).stdout.strip()
    response = httpx.get(
        platform.api_url + "/api/v1/pipelines",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json() == {"pipelines": []}


def _spec(demo_spec: Path, **changes) -> dict:
    import yaml

    spec = yaml.safe_load(demo_spec.read_text())
    folder = demo_spec.parent
    spec["files"] = [{**f, "path": str(folder / f["path"])} for f in spec["files"]]
    spec.pop("model")
    spec.update(changes)
    return spec


def test_submission_naming_a_missing_file_is_refused_with_its_name(client, demo_spec):
    spec = _spec(demo_spec)
    spec["files"][0]["path"] = "/nonexistent/signal.root"
    with pytest.raises(ClientError) as error:
        client.submit(spec)
    assert error.value.status == 422
    assert "/nonexistent/signal.root" in str(error.value)


def test_submission_naming_a_missing_tree_is_refused_with_its_name(client, demo_spec):
    with pytest.raises(ClientError) as error:
        client.submit(_spec(demo_spec, branch="NoSuchTree"))
    assert error.value.status == 422
    assert "NoSuchTree" in str(error.value)


def test_submission_with_a_malformed_field_is_refused_naming_the_field(client, demo_spec):
    with pytest.raises(ClientError) as error:
        client.submit(_spec(demo_spec, epochs="many"))
    assert error.value.status == 422
    assert "epochs" in str(error.value)


def test_refused_submissions_leave_no_pipeline_behind(client, finished_run):
    assert [r["id"] for r in client.pipelines()] == [finished_run["id"]]


def test_failure_inside_the_job_shows_in_the_pipeline_status(client, demo_spec):
    broken = "def model(idim):\n    raise ValueError('the model cannot be built: boom')\n"
    record = client.submit(_spec(demo_spec, name="broken", epochs=1), model_source=broken)
    final = client.wait(record["id"], poll=POLL, timeout=600)
    assert final["state"] == "FAILED"
    assert "boom" in final["message"]


def test_ray_job_submit_of_mlaas4hep_run_on_mlaas4hep_inputs_registers_a_listed_model(
    client, platform, shared_data, tmp_path
):
    """MLaaS4HEP's workflow recipe (params.json as it is, the file list on the shared data)
    through ``ray job submit -- mlaas4hep run --files --labels --params --model``, with no
    worker count given: the run log says what it chose and which keys it ignored."""
    folder = mlaas4hep_example(tmp_path, "recipe", files=[str(shared_data / NANOAOD)] * 2)
    (folder / "model.py").write_text(DEMO_MODEL)
    env = {**ray_env(), "RAY_AUTH_MODE": "token"}
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        platform.jobs_url,
        "--",
        "mlaas4hep",
        "run",
        *("--files", str(folder / "files.txt"), "--labels", str(folder / "labels.txt")),
        *("--params", str(folder / "params.json"), "--model", str(folder / "model.py")),
        *("--name", "recipe-cli", "--owner", client.whoami()["owner"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deadline = time.monotonic() + 60
    while "recipe-cli" not in json.dumps(client.models()):
        assert time.monotonic() < deadline, client.models()
        time.sleep(POLL)
    record = next(r for r in client.pipelines() if r["name"] == "recipe-cli")
    log = client.logs(record["id"])
    assert "spec keys accepted and ignored: MLaaS4HEP keys with no use here: hist" in log
    assert "training on 2 worker(s) x {CPU: 1}: num_workers and cpus_per_worker not set" in log
    spec = json.loads(client.artifact(record["id"], "spec.json"))
    assert spec["shuffle"] == "blocks" and spec["epochs"] == 5 and spec["hist"] == "pdfs"


def test_mlaas4hep_submit_files_sends_mlaas4hep_params_as_they_are(
    client, platform, issuer, shared_data, tmp_path
):
    """``mlaas4hep submit --files ...`` with MLaaS4HEP's src/python params.json (its
    redirector beside local files, ``shuffle: true``, ``hist``) is accepted and queued;
    cancelled before it trains (the recipe above trains)."""
    from mlaas4hep.cli.main import main

    folder = mlaas4hep_example(tmp_path, "src_python", files=[str(shared_data / NANOAOD)] * 2)
    (folder / "model.py").write_text(DEMO_MODEL)
    argv = ["submit", "--url", platform.api_url, "--token", issuer.mint("alice")]
    argv += ["--files", str(folder / "files.txt"), "--labels", str(folder / "labels.txt")]
    argv += ["--params", str(folder / "params.json"), "--model", str(folder / "model.py")]
    assert main([*argv, "--name", "src-python-submit"]) == 0
    record = next(r for r in client.pipelines() if r["name"] == "src-python-submit")
    client.cancel(record["id"])
    spec = json.loads(client.artifact(record["id"], "spec.json"))
    assert spec["shuffle"] == "blocks" and spec["redirector"] == "root://cms-xrd-global.cern.ch"
    assert (spec["nevts"], spec["chunk_size"], spec["epochs"], spec["batch_size"]) == (
        3000,
        1000,
        50,
        256,
    )
    assert spec["resources"]["num_workers"] is None and spec["hist"] == "pdfs"


def _resume_when_stopped(client, run_id: str, timeout: float = 120) -> dict:
    """Resume ``run_id``, retrying while its cancelled job is still stopping."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.resume(run_id)
        except ClientError as error:
            if error.status != 409 or "still stopping" not in str(error):
                raise
            assert time.monotonic() < deadline, str(error)
            time.sleep(1)


def test_cancelled_pipeline_resumes_from_its_latest_checkpoint(client, demo_spec):
    epochs = 10
    spec = _spec(demo_spec, name="resumable", epochs=epochs, resources={"num_workers": 1})
    run_id = client.submit(spec)["id"]
    deadline = time.monotonic() + 600
    while True:
        record = client.pipeline(run_id)
        assert record["state"] in {"PENDING", "RUNNING"}, record
        if record["progress"].get("epoch", 0) >= 2:
            break
        assert time.monotonic() < deadline, record
        time.sleep(POLL)
    assert client.cancel(run_id)["state"] == "CANCELLED"
    with pytest.raises(ClientError) as error:
        client.resume("run-20000101-000000-abcdef")
    assert error.value.status == 404

    resumed = _resume_when_stopped(client, run_id)
    assert resumed["state"] == "PENDING"
    assert resumed["job_id"] == f"{run_id}-r1" and resumed["resumes"] == 1
    final = client.wait(run_id, poll=POLL, timeout=900)
    assert final["state"] == "SUCCEEDED", final.get("message")
    assert final["progress"]["epoch"] == epochs
    history = json.loads(client.artifact(run_id, "history.json"))
    assert [row["epoch"] for row in history] == list(range(epochs))
    # The resumed job's own log: it continued after the checkpointed epochs.
    log = client.logs(run_id)
    assert "resume 1: training continues from the run's latest checkpoint" in log
    assert "epoch 1/10:" not in log and "epoch 10/10:" in log
    with pytest.raises(ClientError) as error:
        client.resume(run_id)
    assert error.value.status == 409
    assert "succeeded: only a cancelled or failed one resumes" in str(error.value)
