"""Per-replica caches of the inference service: registry lookups under the registry's
stamp, loaded bundles by model id, the numpy forward pass of dense models, and the
micro-batcher that merges concurrent small predictions."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import numpy as np
import pytest
from serve_fixtures import local_predict, make_bundle, make_image_bundle

from mlaas4hep.bundle import load_bundle
from mlaas4hep.serve.runtime.microbatch import PROBE_CALLS, MicroBatcher
from mlaas4hep.serve.runtime.model_cache import LookupCache, ModelCache, parse_model_id
from mlaas4hep.store.registry import ModelNotFound, ModelRegistry
from mlaas4hep.store.storage import Storage

ROWS = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(Storage(str(tmp_path / "storage")))


def test_every_registry_change_writes_a_new_stamp(registry, tmp_path):
    bundle = make_bundle(tmp_path / "b", "m")
    stamps = [registry.stamp()]
    registry.register("m", bundle, owner="alice")
    stamps.append(registry.stamp())
    registry.set_visibility("m", "public", None)
    stamps.append(registry.stamp())
    registry.delete("m")
    stamps.append(registry.stamp())
    assert stamps[0] == "" and len(set(stamps)) == 4
    assert registry.storage.listdir("models") == []  # the stamp file is hidden


def test_cached_lookups_see_uploads_and_deletes_at_once(registry, tmp_path):
    cache = LookupCache(registry)
    registry.register("other", make_bundle(tmp_path / "o", "other"), owner="alice")
    with pytest.raises(ModelNotFound, match="model 'm' not found"):
        cache.lookup("m")
    registry.register("m", make_bundle(tmp_path / "v1", "m", seed=1), owner="alice")
    assert cache.lookup("m").version == 1
    registry.register("m", make_bundle(tmp_path / "v2", "m", seed=2), owner="alice")
    assert cache.lookup("m").version == 2
    assert cache.lookup("m", 1).version == 1
    registry.delete("m", 1)
    with pytest.raises(ModelNotFound, match=re.escape("model 'm' has no version 1")):
        cache.lookup("m", 1)
    registry.delete("m")
    with pytest.raises(ModelNotFound, match="model 'm' not found"):
        cache.lookup("m")


def test_cached_lookups_read_the_record_once_while_the_stamp_holds(registry, tmp_path, monkeypatch):
    registry.register("m", make_bundle(tmp_path / "b", "m"), owner="alice")
    cache = LookupCache(registry)
    reads = []
    record = registry.record
    monkeypatch.setattr(registry, "record", lambda name: reads.append(name) or record(name))
    first = [cache.lookup("m") for _ in range(5)]
    registry.set_visibility("m", "public", None)
    second = cache.lookup("m")
    assert reads == ["m", "m"]
    assert {f.model_id for f in first} == {second.model_id}
    assert first[0].record.visibility == "private" and second.record.visibility == "public"


def test_replaced_version_gets_a_new_model_id_and_the_cache_loads_it(registry, tmp_path):
    old = make_bundle(tmp_path / "old", "m", seed=1)
    new = make_bundle(tmp_path / "new", "m", seed=2)
    lookups, models = LookupCache(registry), ModelCache(registry)
    registry.register("m", old, owner="alice")
    first_id = lookups.lookup("m").model_id
    first = asyncio.run(models.get(first_id))
    registry.delete("m")
    registry.register("m", new, owner="alice")
    second_id = lookups.lookup("m").model_id
    second = asyncio.run(models.get(second_id))
    assert parse_model_id(first_id) == parse_model_id(second_id) == ("m", 1)
    assert first_id != second_id
    assert first_id not in models and second_id in models  # the replaced folder is dropped
    np.testing.assert_allclose(first.predict(ROWS), local_predict(old, ROWS), rtol=1e-5)
    np.testing.assert_allclose(second.predict(ROWS), local_predict(new, ROWS), rtol=1e-5)


def test_model_cache_loads_once_for_concurrent_requests_and_evicts_the_oldest(
    registry, tmp_path, monkeypatch
):
    import mlaas4hep.serve.runtime.model_cache as model_cache

    ids = []
    for i in range(3):
        registry.register(f"m{i}", make_bundle(tmp_path / f"b{i}", f"m{i}", seed=i), owner="a")
        ids.append(LookupCache(registry).lookup(f"m{i}").model_id)
    loads = []
    load = model_cache.load_registered
    monkeypatch.setattr(
        model_cache, "load_registered", lambda r, n, v: loads.append(n) or load(r, n, v)
    )
    models = ModelCache(registry, capacity=2)

    async def requests() -> None:
        await asyncio.gather(*(models.get(ids[0]) for _ in range(5)))
        await models.get(ids[1])
        await models.get(ids[0])  # now the most recently used
        await models.get(ids[2])

    asyncio.run(requests())
    assert loads == ["m0", "m1", "m2"]
    assert ids[0] in models and ids[1] not in models and ids[2] in models


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_dense_models_are_predicted_in_numpy_like_keras(tmp_path, n_outputs):
    bundle = make_bundle(tmp_path / "b", "m", n_outputs=n_outputs)
    model = load_bundle(bundle, "m", 1)
    rows = np.concatenate([ROWS, ROWS * 100])  # saturated outputs too
    assert "tensorflow" not in type(model.predict(rows)).__module__
    expected = local_predict(bundle, rows)
    np.testing.assert_allclose(model.predict(rows), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.predict(rows[:1]), expected[:1], rtol=1e-5, atol=1e-7)


def test_dense_models_can_be_predicted_through_their_keras_graph(tmp_path):
    bundle = make_bundle(tmp_path / "b", "m")
    numpy_model = load_bundle(bundle, "m", 1)
    keras_model = load_bundle(bundle, "m", 1, numpy_dense=False)
    np.testing.assert_allclose(
        keras_model.predict(ROWS), numpy_model.predict(ROWS), rtol=1e-5, atol=1e-7
    )
    assert keras_model._call.__qualname__.startswith("_compiled.")  # the traced graph
    assert numpy_model._call.__qualname__.startswith("_dense_forward.")


def test_other_models_are_predicted_by_tensorflow(tmp_path):
    bundle = make_image_bundle(tmp_path / "img", "img")
    model = load_bundle(bundle, "img", 1)
    pixels = np.random.default_rng(0).random((2, 64)).astype(np.float32)
    expected = local_predict(bundle, pixels.reshape(2, 8, 8, 1))
    np.testing.assert_allclose(model.predict(pixels), expected, rtol=1e-5)


# --------------------------------------------------------------------------- micro-batching


async def _concurrently(batcher: MicroBatcher, matrices: list[np.ndarray]) -> list[Any]:
    """Each matrix predicted by its own concurrent caller: outputs or the exceptions raised."""
    return await asyncio.gather(*(batcher.predict(m) for m in matrices), return_exceptions=True)


def test_concurrent_single_rows_of_a_graph_model_share_one_call_and_get_their_own_rows(
    registry, tmp_path
):
    bundle = make_image_bundle(tmp_path / "img", "img")
    registry.register("img", bundle, owner="alice")
    model_id = LookupCache(registry).lookup("img").model_id
    models = ModelCache(registry, batch_above_s=0)
    model = asyncio.run(models.get(model_id))
    rows = [row[None, :] for row in np.random.default_rng(1).random((32, 64), dtype=np.float32)]
    batcher = models.batcher(model_id)

    outputs = asyncio.run(_concurrently(batcher, rows))

    assert (batcher.calls, batcher.rows) == (1, 32)
    expected = model.predict(np.concatenate(rows))
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out, expected[i : i + 1], rtol=1e-5, atol=1e-7)


def _doubled_unless_negative(matrix: np.ndarray) -> np.ndarray:
    """A model that refuses rows with a negative value, else answers twice its inputs."""
    if (matrix < 0).any():
        raise ValueError(f"negative input among {len(matrix)} rows")
    return matrix * 2


def test_a_merged_call_that_fails_answers_each_caller_its_own_rows_or_error():
    batcher = MicroBatcher(_doubled_unless_negative, batch_above_s=0)
    matrices = [np.full((1, 3), v, dtype=np.float32) for v in (1.0, -1.0, 2.0, 3.0)]

    outputs = asyncio.run(_concurrently(batcher, matrices))

    assert isinstance(outputs[1], ValueError) and "among 1 rows" in str(outputs[1])
    for i in (0, 2, 3):
        np.testing.assert_array_equal(outputs[i], matrices[i] * 2)


def test_merged_calls_take_at_most_max_rows_and_keep_arrival_order():
    seen: list[int] = []

    def model(matrix: np.ndarray) -> np.ndarray:
        seen.append(len(matrix))
        return matrix[:, :1]

    batcher = MicroBatcher(model, max_rows=8, batch_above_s=0)
    matrices = [np.full((3, 2), i, dtype=np.float32) for i in range(10)]

    outputs = asyncio.run(_concurrently(batcher, matrices))

    assert seen == [6, 6, 6, 6, 6]  # two 3-row requests a call: a third would make 9
    assert [float(out[0, 0]) for out in outputs] == list(range(10))


@pytest.mark.parametrize(("batch_above_s", "merged"), [(60.0, False), (1e-12, True)])
def test_only_models_whose_call_costs_more_than_the_threshold_are_merged(batch_above_s, merged):
    batcher = MicroBatcher(_doubled_unless_negative, batch_above_s=batch_above_s)
    probes = [np.ones((1, 2), dtype=np.float32)] * PROBE_CALLS
    asyncio.run(_concurrently(batcher, probes))  # timed one by one on the event loop
    assert batcher.calls == PROBE_CALLS

    asyncio.run(_concurrently(batcher, [np.ones((1, 2), dtype=np.float32)] * 16))

    assert batcher.batching is merged
    assert batcher.calls == PROBE_CALLS + (1 if merged else 16)
