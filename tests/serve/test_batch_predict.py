"""Batch scoring of whole ROOT datasets with a model bundle on Ray Data actors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
from model_format_fixtures import dense_model, write_format_bundle
from serve_fixtures import local_predict, make_bundle

from mlaas4hep.cli.demo import DEMO_TREE, write_demo_data
from mlaas4hep.cli.main import main
from mlaas4hep.data.features import FeatureSpecs
from mlaas4hep.data.flatten import flatten_columns, to_model_input

pytestmark = pytest.mark.ray

DEMO_SPECS = {
    "fkeys": ["MET_pt", "HT"],
    "jkeys": ["Jet_pt"],
    "jdim": {"Jet_pt": 3},
    "minv": {"MET_pt": 0.0, "HT": 0.0, "Jet_pt": 20.0},
    "maxv": {"MET_pt": 200.0, "HT": 800.0, "Jet_pt": 300.0},
    "nans": {},
    "events": {"total": 600},
}


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> list[str]:
    signal, background = write_demo_data(tmp_path_factory.mktemp("demo"), events=300, seed=5)
    return [str(signal), str(background)]


@pytest.fixture(scope="module")
def scorer(ray_cluster, platform_settings, tmp_path_factory):
    """A bundle taking the demo features, registered as ``demoscore``."""
    from mlaas4hep.store.registry import ModelRegistry
    from mlaas4hep.store.storage import Storage

    bundle = make_bundle(tmp_path_factory.mktemp("scorer"), "demoscore", seed=4, specs=DEMO_SPECS)
    ModelRegistry(Storage(platform_settings.storage)).register("demoscore", bundle, owner="t")
    return bundle


def expected_scores(bundle, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(event numbers, scores)`` of one file computed in the test process."""
    arrays = uproot.open(path)[DEMO_TREE].arrays(["event", "MET_pt", "HT", "Jet_pt"])
    columns = {key: arrays[key] for key in ("MET_pt", "HT", "Jet_pt")}
    features, _ = flatten_columns(columns, FeatureSpecs.from_dict(DEMO_SPECS))
    return arrays["event"].to_numpy(), local_predict(bundle, to_model_input(features))[:, 0]


def test_predict_files_writes_identifiers_and_scores_of_every_event(
    scorer, demo_files, platform_settings, tmp_path, capsys
):
    out = tmp_path / "scores"
    options = ["--identifier", "run,event", "--storage", platform_settings.storage]
    code = main(["predict-files", "demoscore", *demo_files, "--out", str(out), *options])
    assert code == 0, capsys.readouterr().err
    assert "wrote 600 scored events" in capsys.readouterr().out
    table = pq.read_table(out).to_pandas()
    assert set(table.columns) == {"run", "event", "file", "score"}
    assert len(table) == 600
    for path in demo_files:
        events, scores = expected_scores(scorer, path)
        got = table[table.file == path].sort_values("event")
        np.testing.assert_array_equal(got.event.to_numpy(), np.sort(events))
        np.testing.assert_allclose(got.score.to_numpy(), scores[np.argsort(events)], rtol=1e-5)


def test_predict_files_from_a_bundle_folder_with_two_actors(scorer, demo_files, tmp_path):
    from mlaas4hep.serve.batch_predict import predict_files

    result = predict_files(
        str(scorer), demo_files, str(tmp_path / "out"), actors=2, cpus_per_actor=0.25
    )
    assert result.events == 600 and result.columns == ["file", "score"]


def test_predict_files_refuses_bundles_without_specs_and_files_without_the_branches(
    scorer, demo_files, shared_data, tmp_path, capsys
):
    plain = make_bundle(tmp_path / "plain", "plain")
    code = main(["predict-files", str(plain), *demo_files, "--out", str(tmp_path / "a")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "error: model 'plain' has no specs.json: batch scoring needs the feature specs"
    )
    hzz = str(shared_data / "uproot-HZZ.root")
    code = main(["predict-files", str(scorer), hzz, "--tree", "events", "--out", str(tmp_path)])
    assert code == 1
    error = capsys.readouterr().err
    assert "uproot-HZZ.root" in error and "MET_pt" in error


@pytest.mark.parametrize("fmt", ["onnx", "graphdef"])
def test_predict_files_scores_bundles_of_every_model_format_like_the_model(
    ray_cluster, demo_files, tmp_path, fmt
):
    from mlaas4hep.serve.batch_predict import predict_files

    model = dense_model(seed=8, n_features=5)
    bundle = write_format_bundle(model, fmt, tmp_path / fmt, f"demo-{fmt}")
    (bundle / "specs.json").write_text(json.dumps(DEMO_SPECS))
    out = tmp_path / "out"
    result = predict_files(
        str(bundle), demo_files[:1], str(out), identifiers=["event"], cpus_per_actor=0.25
    )
    assert result.columns == ["event", "file", "score_background", "score_signal"]
    arrays = uproot.open(demo_files[0])[DEMO_TREE].arrays(["event", "MET_pt", "HT", "Jet_pt"])
    columns = {key: arrays[key] for key in ("MET_pt", "HT", "Jet_pt")}
    features, _ = flatten_columns(columns, FeatureSpecs.from_dict(DEMO_SPECS))
    expected = np.asarray(model(to_model_input(features), training=False))
    table = pq.read_table(out).to_pandas().sort_values("event")
    order = np.argsort(arrays["event"].to_numpy())
    np.testing.assert_allclose(table.score_signal.to_numpy(), expected[order, 1], atol=1e-4)


@pytest.fixture
def predictions_api(tfaas, platform_settings, scorer):
    """An httpx client of the ``/api/v1`` app (in this process, jobs on the session's head)
    and the ``apiscore`` model (demo features) owned by alice."""
    import httpx

    from mlaas4hep.serve.apps.context import ApiContext
    from mlaas4hep.serve.apps.pipeline_api import create_pipeline_api

    if "apiscore" not in {record.name for record in tfaas.registry.list_records()}:
        tfaas.registry.register("apiscore", scorer, owner=tfaas.owner("alice"))
    app = create_pipeline_api(ApiContext.from_settings(platform_settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


def _call(client, method: str, path: str, token: str, **kwargs):
    import asyncio

    headers = {"Authorization": f"Bearer {token}"}
    return asyncio.run(client.request(method, path, headers=headers, timeout=60, **kwargs))


def test_predictions_api_scores_files_in_a_ray_job(
    tfaas, predictions_api, scorer, demo_files, shared_data, platform_settings
):
    from serve_fixtures import wait_for

    from mlaas4hep.store.storage import Storage

    alice, bob = tfaas.token("alice"), tfaas.token("bob")
    body = {"model": "apiscore", "files": demo_files, "identifier": ["event"]}
    created = _call(predictions_api, "POST", "/predictions", alice, json=body)
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["state"] == "PENDING" and record["model"] == "apiscore/versions/1"
    path = f"/predictions/{record['id']}"

    def finished() -> bool:
        state = _call(predictions_api, "GET", path, alice).json()["state"]
        assert state not in ("FAILED", "CANCELLED"), state
        return state == "SUCCEEDED"

    wait_for(finished, timeout=300)
    done = _call(predictions_api, "GET", path, alice).json()
    assert done["events"] == 600 and done["columns"] == ["event", "file", "score"]
    table = pq.read_table(done["out"]).to_pandas()
    events, scores = expected_scores(scorer, demo_files[0])
    got = table[table.file == demo_files[0]].sort_values("event")
    np.testing.assert_allclose(got.score.to_numpy(), scores[np.argsort(events)], rtol=1e-5)
    assert Storage(platform_settings.storage).exists("predictions", record["id"], "result.json")
    assert _call(predictions_api, "GET", path, bob).status_code == 404


@pytest.mark.parametrize(
    ("change", "sub", "status", "message"),
    [
        ({"model": "nosuch"}, "alice", 404, "model 'nosuch' not found"),
        ({"model": "apiscore/versions/9"}, "alice", 404, "model 'apiscore' has no version 9"),
        ({}, "bob", 404, "model 'apiscore' not found"),  # another user's private model
        ({"model": "higgs"}, "alice", 400, "model 'higgs' version 1 has no usable specs.json"),
        ({"files": []}, "alice", 422, "files"),
        ({"tree": "nosuchtree"}, "alice", 422, "nosuchtree"),
    ],
)
def test_bad_prediction_requests_are_refused_before_any_job(
    tfaas, higgs, predictions_api, demo_files, change, sub, status, message
):
    body = {"model": "apiscore", "files": demo_files, **change}
    answer = _call(predictions_api, "POST", "/predictions", tfaas.token(sub), json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.text
