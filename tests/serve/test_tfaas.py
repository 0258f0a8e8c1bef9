"""The TFaaS-compatible inference service over real HTTP on a real Serve deployment."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_fixtures import (
    FEATURES,
    MAX_MEMBER_BYTES,
    bundle_tarball,
    local_predict,
    make_bundle,
    tarball,
    wait_for,
)

from mlaas4hep.serve.protocols import tfaas_pb2

pytestmark = pytest.mark.ray

ROWS = np.array(
    [[0.5, -1.0, 2.0, 91.2], [1.5, 0.3, -0.7, 125.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32
)


def versions(tfaas, name: str) -> list[int]:
    return tfaas.registry.versions(name)


def test_json_prediction_of_one_row_equals_local_model(tfaas, higgs):
    with tfaas.client() as client:
        answer = client.post(
            "/json", json={"keys": FEATURES, "values": ROWS[0].tolist(), "model": "higgs"}
        )
    assert answer.status_code == 200, answer.text
    expected = local_predict(higgs, ROWS[:1])[0]
    np.testing.assert_allclose(answer.json(), expected, rtol=1e-6, atol=1e-7)
    assert len(answer.json()) == 1


def test_json_prediction_of_several_rows_gives_one_float_per_row(tfaas, higgs):
    with tfaas.client() as client:
        answer = client.post("/predict/json", json={"values": ROWS.tolist(), "model": "higgs"})
    assert answer.status_code == 200, answer.text
    assert all(isinstance(v, float) for v in answer.json())
    np.testing.assert_allclose(
        answer.json(), local_predict(higgs, ROWS)[:, 0], rtol=1e-6, atol=1e-7
    )


def test_multi_output_model_gives_a_list_per_row(tfaas, multi):
    with tfaas.client() as client:
        answer = client.post("/json", json={"values": ROWS.tolist(), "model": "multi/versions/1"})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json(), local_predict(multi, ROWS), rtol=1e-6, atol=1e-7)


def test_keys_in_another_order_are_put_in_the_model_feature_order(tfaas, higgs):
    shuffled = [FEATURES[i] for i in (3, 1, 0, 2)]
    with tfaas.client() as client:
        answer = client.post(
            "/json",
            json={"keys": shuffled, "values": ROWS[0][[3, 1, 0, 2]].tolist(), "model": "higgs"},
        )
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(
        answer.json(), local_predict(higgs, ROWS[:1])[0], rtol=1e-6, atol=1e-7
    )


def test_nan_values_are_predicted_as_zero(tfaas, higgs):
    with tfaas.client() as client:
        answer = client.post(
            "/json",
            content=json.dumps({"values": [0.5, float("nan"), 2.0, None], "model": "higgs"}),
        )
    assert answer.status_code == 200, answer.text
    expected = local_predict(higgs, np.array([[0.5, 0.0, 2.0, 0.0]]))[0]
    np.testing.assert_allclose(answer.json(), expected, rtol=1e-6, atol=1e-7)


def test_proto_prediction_returns_labelled_classes(tfaas, multi):
    row = tfaas_pb2.Row(key=FEATURES, value=ROWS[1].tolist(), model="multi")
    with tfaas.client() as client:
        answer = client.post("/proto", content=row.SerializeToString())
    assert answer.status_code == 200, answer.text
    predictions = tfaas_pb2.Predictions.FromString(answer.content)
    assert [c.label for c in predictions.prediction] == ["class0", "class1", "class2"]
    got = [c.probability for c in predictions.prediction]
    np.testing.assert_allclose(got, local_predict(multi, ROWS[1:2])[0], rtol=1e-6, atol=1e-7)


def test_concurrent_requests_to_two_models_each_get_their_own_rows(tfaas, higgs, multi):
    rng = np.random.default_rng(3)
    requests = [
        ("higgs" if i % 2 else "multi", rng.normal(size=(1 + i % 4, 4)).astype(np.float32))
        for i in range(24)
    ]

    def call(item):
        model, x = item
        with tfaas.client() as client:
            return client.post("/json", json={"values": x.tolist(), "model": model})

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(call, requests))
    for (model, x), answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        expected = local_predict(higgs if model == "higgs" else multi, x)
        expected = expected[:, 0] if model == "higgs" else expected
        np.testing.assert_allclose(answer.json(), expected, rtol=1e-6, atol=1e-7)


def test_proto_prediction_of_a_binary_model_names_the_positive_class(tfaas, higgs):
    row = tfaas_pb2.Row(key=FEATURES, value=ROWS[0].tolist(), model="higgs")
    with tfaas.client() as client:
        answer = client.post("/predict/proto", content=row.SerializeToString())
    (only,) = tfaas_pb2.Predictions.FromString(answer.content).prediction
    assert only.label == "signal"
    np.testing.assert_allclose(
        only.probability, local_predict(higgs, ROWS[:1])[0, 0], rtol=1e-6, atol=1e-7
    )


def test_models_lists_the_bundle_with_tfaas_params_keys(tfaas, higgs):
    with tfaas.client() as client:
        models = client.get("/models").json()
        params = client.get("/params/higgs").json()
    entry = next(m for m in models if m["name"] == "higgs")
    assert entry["inputNode"] == "features" and entry["outputNode"] == "scores"
    assert entry["model"] == "model.keras" and entry["owner"] == tfaas.owner("alice")
    assert entry["visibility"] == "private"
    assert params["inputNode"] == "features" and "input_node" not in params


def test_private_models_are_hidden_from_other_users_as_not_found(tfaas, higgs):
    with tfaas.client("bob") as client:
        names = [m["name"] for m in client.get("/models").json()]
        answer = client.post("/json", json={"values": ROWS[0].tolist(), "model": "higgs"})
    assert "higgs" not in names
    assert answer.status_code == 404
    assert answer.json() == {"error": "model 'higgs' not found"}


def test_requests_without_a_token_are_refused_but_status_answers(tfaas, higgs):
    import httpx

    with httpx.Client(base_url=tfaas.url, timeout=30) as client:
        refused = client.post("/json", json={"values": ROWS[0].tolist(), "model": "higgs"})
        status = client.get("/status")
    assert refused.status_code == 401 and "error" in refused.json()
    assert status.status_code == 200 and status.json()["status"] == "ok"


def test_default_model_from_post_params_serves_requests_without_model(tfaas, higgs):
    with tfaas.client("carol") as client:
        missing = client.post("/json", json={"values": ROWS[0].tolist()})
        assert missing.status_code == 400
        assert "no default model" in missing.json()["error"]
    bundle = make_bundle(higgs.parent / "carol", "carolmodel", seed=3)
    tfaas.registry.register("carolmodel", bundle, owner=tfaas.owner("carol"))
    with tfaas.client("carol") as client:
        assert client.post("/params", json={"name": "carolmodel"}).status_code == 200
        answer = client.post("/json", json={"values": ROWS[0].tolist()})
        current = client.get("/params").json()
    assert current["name"] == "carolmodel"
    np.testing.assert_allclose(
        answer.json(), local_predict(bundle, ROWS[:1])[0], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"values": [1.0, 2.0, 3.0], "model": "higgs"}, 400, "takes 4 values a row, got 3"),
        ({"values": [1.0, "x", 3.0, 4.0], "model": "higgs"}, 400, "values[1] is 'x', not a number"),
        ({"values": [[1.0, 2.0, 3.0, 4.0], [1.0]], "model": "higgs"}, 400, "values[1] has 1"),
        ({"values": [], "model": "higgs"}, 400, "'values' must be a non-empty list"),
        ({"values": [1.0, 2.0, 3.0, 4.0], "model": "nosuch"}, 404, "model 'nosuch' not found"),
        (
            {"values": [1.0, 2.0, 3.0, 4.0], "model": "higgs/versions/7"},
            404,
            "model 'higgs' has no version 7",
        ),
        ({"values": [1.0, 2.0, 3.0, 4.0], "model": "higgs/v/1"}, 400, "invalid model"),
        (
            {"keys": ["a", "b"], "values": [1.0, 2.0, 3.0, 4.0], "model": "higgs"},
            400,
            "'keys' has 2 names but rows have 4 values",
        ),
    ],
)
def test_bad_json_requests_get_a_clear_client_error(tfaas, higgs, body, status, message):
    with tfaas.client() as client:
        answer = client.post("/json", json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_invalid_json_and_protobuf_bodies_are_client_errors(tfaas, higgs):
    with tfaas.client() as client:
        bad_json = client.post("/json", content=b"{not json")
        bad_proto = client.post("/proto", content=b"\xff\xff\xff")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    assert bad_proto.status_code == 400 and "tfaaspb.Row" in bad_proto.json()["error"]


def upload_form(bundle, name):
    files = {
        "params": ("params.json", (bundle / "params.json").read_bytes()),
        "model": ("model.keras", (bundle / "model.keras").read_bytes()),
        "labels": ("labels.txt", (bundle / "labels.txt").read_bytes()),
    }
    return {"name": name}, files


def test_multipart_upload_registers_a_model_owned_by_the_caller(tfaas, tmp_path):
    bundle = make_bundle(tmp_path / "b", "uploaded", seed=5)
    data, files = upload_form(bundle, "uploaded")
    with tfaas.client() as client:
        answer = client.post("/upload", data=data, files=files)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"name": "uploaded", "version": 1, "visibility": "private"}
        predicted = client.post("/json", json={"values": ROWS.tolist(), "model": "uploaded"})
    record = tfaas.registry.record("uploaded")
    assert record.owner == tfaas.owner("alice") and record.visibility == "private"
    np.testing.assert_allclose(
        predicted.json(), local_predict(bundle, ROWS)[:, 0], rtol=1e-6, atol=1e-7
    )


def test_tarball_upload_registers_the_next_version(tfaas, tmp_path):
    first = make_bundle(tmp_path / "v1", "tarred", seed=6)
    second = make_bundle(tmp_path / "v2", "tarred", seed=7)
    with tfaas.client() as client:
        one = client.post("/upload", content=bundle_tarball(first, top="tarred"))
        two = client.post(
            "/upload",
            content=bundle_tarball(second),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        latest = client.post("/json", json={"values": ROWS.tolist(), "model": "tarred"})
        older = client.post("/json", json={"values": ROWS.tolist(), "model": "tarred/versions/1"})
    assert one.json()["version"] == 1 and two.json()["version"] == 2, (one.text, two.text)
    np.testing.assert_allclose(
        latest.json(), local_predict(second, ROWS)[:, 0], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(older.json(), local_predict(first, ROWS)[:, 0], rtol=1e-6, atol=1e-7)


def test_upload_of_a_name_held_by_another_user_is_a_conflict(tfaas, higgs):
    before = versions(tfaas, "higgs")
    data, files = upload_form(higgs, "higgs")
    with tfaas.client("bob") as client:
        answer = client.post("/upload", data=data, files=files)
    assert answer.status_code == 409
    assert answer.json() == {"error": "model name 'higgs' belongs to another user"}
    assert versions(tfaas, "higgs") == before


def _bad_tarballs(bundle):
    good = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    return {
        "dotdot": (tarball({**good, "../evil.txt": b"x"}), "leaves the bundle"),
        "absolute": (tarball({**good, "/tmp/evil.txt": b"x"}), "absolute path"),
        "symlink": (tarball(good, links={"link": "/etc/passwd"}), "is a link"),
        "oversized": (
            tarball({**good, "big.bin": b"\0" * (MAX_MEMBER_BYTES + 1)}),
            f"more than the limit of {MAX_MEMBER_BYTES}",
        ),
        "not-gzip": (b"PK\x03\x04 this is a zip", "not a gzip tarball"),
        "truncated": (tarball(good)[:200], "not a valid gzip tarball"),
        "no-params": (tarball({"model.keras": good["model.keras"]}), "no params.json"),
    }


@pytest.mark.parametrize(
    "case", ["dotdot", "absolute", "symlink", "oversized", "not-gzip", "truncated", "no-params"]
)
def test_bad_tarball_uploads_are_refused_and_change_nothing(tfaas, tmp_path, case):
    bundle = make_bundle(tmp_path / "b", "badtar", seed=8)
    body, message = _bad_tarballs(bundle)[case]
    with tfaas.client() as client:
        answer = client.post("/upload", content=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    assert versions(tfaas, "badtar") == []


def test_bad_multipart_uploads_are_refused_and_change_nothing(tfaas, tmp_path):
    bundle = make_bundle(tmp_path / "b", "badform", seed=9)
    data, files = upload_form(bundle, "othername")
    corrupt = dict(files, model=("model.keras", b"not a keras file"))
    with tfaas.client() as client:
        mismatch = client.post("/upload", data=data, files=files)
        broken = client.post("/upload", data={"name": "badform"}, files=corrupt)
        no_model = client.post(
            "/upload", data={"name": "badform"}, files={"params": files["params"]}
        )
    assert mismatch.status_code == 400
    assert mismatch.json()["error"] == (
        "params.json names model 'badform' but the upload 'name' is 'othername'"
    )
    assert broken.status_code == 400 and "cannot be loaded" in broken.json()["error"]
    assert no_model.status_code == 400 and "lacks the 'model' file" in no_model.json()["error"]
    assert versions(tfaas, "badform") == [] and versions(tfaas, "othername") == []


def _replicas_seen(client, path, count=40):
    return {client.get(path).json()["replica"] for _ in range(count)}


def test_deleted_model_stops_answering_on_every_replica(tfaas, tmp_path):
    bundle = make_bundle(tmp_path / "d", "doomed", seed=10)
    tfaas.registry.register("doomed", bundle, owner=tfaas.owner("alice"))
    body = {"values": ROWS[0].tolist(), "model": "doomed"}
    with tfaas.client() as client:
        assert len(_replicas_seen(client, "/status")) == 2  # both ingress replicas answer
        for _ in range(10):  # load it on the model replicas
            assert client.post("/json", json=body).status_code == 200
        deleted = client.request("DELETE", "/delete", data={"model": "doomed"})
        assert deleted.status_code == 200, deleted.text
        answers = [client.post("/json", json=body) for _ in range(20)]
        again = client.delete("/delete/doomed")
    assert {a.status_code for a in answers} == {404}
    assert answers[0].json() == {"error": "model 'doomed' not found"}
    assert again.status_code == 404
    assert versions(tfaas, "doomed") == []


def test_reuploaded_model_answers_with_the_new_weights(tfaas, tmp_path):
    old = make_bundle(tmp_path / "old", "phoenix", seed=11)
    new = make_bundle(tmp_path / "new", "phoenix", seed=12)
    body = {"values": ROWS.tolist(), "model": "phoenix"}
    with tfaas.client() as client:
        assert client.post("/upload", content=bundle_tarball(old)).status_code == 200
        first = client.post("/json", json=body).json()
        assert client.delete("/delete/phoenix").status_code == 200
        assert client.post("/upload", content=bundle_tarball(new)).status_code == 200
        second = [client.post("/json", json=body).json() for _ in range(6)]
    np.testing.assert_allclose(first, local_predict(old, ROWS)[:, 0], rtol=1e-6, atol=1e-7)
    for answer in second:
        np.testing.assert_allclose(answer, local_predict(new, ROWS)[:, 0], rtol=1e-6, atol=1e-7)


def test_only_the_owner_deletes_a_model(tfaas, higgs):
    with tfaas.client("bob") as client:
        answer = client.delete("/delete/higgs")
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"error": "model 'higgs' not found"}
    assert versions(tfaas, "higgs") == [1]


def test_sequential_json_latency_through_the_proxy(tfaas, higgs):
    body = {"values": ROWS[0].tolist(), "model": "higgs"}
    with tfaas.client() as client:
        for _ in range(5):
            client.post("/json", json=body)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            assert client.post("/json", json=body).status_code == 200
            times.append(time.perf_counter() - start)
    print(
        f"\n/json sequential latency: p50 {np.median(times) * 1e3:.1f} ms, "
        f"p90 {np.percentile(times, 90) * 1e3:.1f} ms over {len(times)} calls"
    )


HZZ_SPECS = {
    "fkeys": ["NMuon", "MET_px"],
    "jkeys": ["Muon_Px"],
    "jdim": {"Muon_Px": 3},
    "minv": {"NMuon": 0.0, "MET_px": -100.0, "Muon_Px": -200.0},
    "maxv": {"NMuon": 4.0, "MET_px": 100.0, "Muon_Px": 200.0},
    "nans": {},
    "events": {"total": 2421},
}


@pytest.fixture(scope="module")
def hzz(tfaas, tmp_path_factory, shared_data):
    """A bundle with specs.json, registered as ``hzz``, and four real events of
    uproot-HZZ.root as branch -> value(s) mappings."""
    import uproot

    from mlaas4hep.data.features import FeatureSpecs

    bundle = make_bundle(tmp_path_factory.mktemp("hzz"), "hzz", seed=13, specs=HZZ_SPECS)
    tfaas.registry.register("hzz", bundle, owner=tfaas.owner("alice"))
    path = shared_data / "uproot-HZZ.root"
    arrays = uproot.open(path)["events"].arrays(["NMuon", "MET_px", "Muon_Px"], entry_stop=4)
    events = [
        {key: arrays[key][i].tolist() for key in ("NMuon", "MET_px", "Muon_Px")} for i in range(4)
    ]
    return bundle, events, FeatureSpecs.from_dict(HZZ_SPECS)


def test_raw_physics_events_are_flattened_with_the_bundle_specs(tfaas, hzz, multi):
    from mlaas4hep.data.flatten import flatten_events, to_model_input

    bundle, events, specs = hzz
    expected = local_predict(bundle, to_model_input(flatten_events(events, specs)))[:, 0]
    with tfaas.client() as client:
        listed = client.post("/events", json={"events": events, "model": "hzz"})
        one = client.post("/predict/events", json={"events": events[1], "model": "hzz"})
        missing = client.post("/events", json={"events": [{"NMuon": 1}], "model": "hzz"})
        no_specs = client.post("/events", json={"events": events[:1], "model": "multi"})
    assert listed.status_code == 200, listed.text
    np.testing.assert_allclose(listed.json(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(one.json(), expected[1:2], rtol=1e-6, atol=1e-7)
    assert missing.status_code == 400 and "'MET_px'" in missing.json()["error"]
    assert no_specs.status_code == 400
    assert no_specs.json() == {"error": "model 'multi' has no specs.json: send 'values' instead"}


def _metrics_text() -> str:
    import httpx
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return httpx.get(url, timeout=10).text


def test_per_model_request_error_latency_and_batch_metrics_are_exported(tfaas, multi):
    with tfaas.client() as client:
        for _ in range(3):
            assert client.post("/json", json={"values": ROWS.tolist(), "model": "multi"}).is_success
        assert client.post("/json", json={"values": [1.0], "model": "multi"}).status_code == 400
    names = (
        "mlaas4hep_model_requests",
        "mlaas4hep_model_errors",
        "mlaas4hep_model_latency_ms",
        "mlaas4hep_model_batch_rows",
    )

    def exported() -> bool:
        lines = [line for line in _metrics_text().splitlines() if 'model="multi"' in line]
        return all(any(name in line for line in lines) for name in names)

    wait_for(exported, timeout=90)


def test_base_path_prefixes_every_route(platform_settings):
    import asyncio

    import httpx

    from mlaas4hep.serve.apps.inference import create_app
    from mlaas4hep.serve.dataplane import DataPlane, TFaaSOptions

    service = DataPlane(platform_settings, TFaaSOptions(base_path="/tfaas/"), None)
    transport = httpx.ASGITransport(app=create_app(service))

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://tfaas") as client:
            return [
                await client.get("/tfaas/status"),
                await client.get("/tfaas/v2/health/live"),
                await client.get("/status"),
                await client.post("/tfaas/json", json={"values": [1.0], "model": "higgs"}),
            ]

    status, live, unprefixed, refused = asyncio.run(calls())
    assert status.json()["status"] == "ok" and live.json() == {"live": True}
    assert unprefixed.status_code == 404
    assert refused.status_code == 401 and refused.json() == {"error": "missing bearer token"}


def test_requests_up_to_the_row_limit_are_predicted_in_the_ingress_larger_ones_are_not(
    tfaas, higgs
):
    import asyncio

    import httpx

    from mlaas4hep.serve.apps.inference import create_app
    from mlaas4hep.serve.dataplane import DataPlane, TFaaSOptions

    # no model deployment behind this ingress: only the in-process path can answer
    service = DataPlane(tfaas.settings, TFaaSOptions(direct_max_rows=len(ROWS)), None)
    transport = httpx.ASGITransport(app=create_app(service))
    more = np.concatenate([ROWS, ROWS[:1]])

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://tfaas", headers=tfaas.headers()
        ) as client:
            return [
                await client.post("/json", json={"values": ROWS.tolist(), "model": "higgs"}),
                await client.post("/json", json={"values": more.tolist(), "model": "higgs"}),
            ]

    small, large = asyncio.run(calls())
    assert small.status_code == 200, small.text
    np.testing.assert_allclose(small.json(), local_predict(higgs, ROWS)[:, 0], rtol=1e-6, atol=1e-7)
    assert large.status_code == 503
    assert large.json() == {"error": "no model server is configured"}


def test_deleting_one_version_keeps_the_others(tfaas, tmp_path):
    first = make_bundle(tmp_path / "v1", "twice", seed=14)
    second = make_bundle(tmp_path / "v2", "twice", seed=15)
    for bundle in (first, second):
        tfaas.registry.register("twice", bundle, owner=tfaas.owner("alice"))
    with tfaas.client() as client:
        deleted = client.delete("/delete/twice/versions/1")
        gone = client.post("/json", json={"values": ROWS.tolist(), "model": "twice/versions/1"})
        latest = client.post("/json", json={"values": ROWS.tolist(), "model": "twice"})
    assert deleted.json() == {"deleted": "twice", "version": 1}
    assert gone.status_code == 404 and gone.json() == {"error": "model 'twice' has no version 1"}
    np.testing.assert_allclose(
        latest.json(), local_predict(second, ROWS)[:, 0], rtol=1e-6, atol=1e-7
    )
    assert versions(tfaas, "twice") == [2]
