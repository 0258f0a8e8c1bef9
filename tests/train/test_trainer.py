"""Distributed training on Ray Train: synchronization, model kinds, resources, splits, metrics.

Each Ray Train run costs ~30-60 s here (worker start, TensorFlow import), so the runs
are module fixtures shared by several tests: a 2-worker run of a MLaaS4HEP model file,
a 1-worker run of the equivalent declarative MLP (the same initial weights for the same
seed) and a 1-worker run whose worker is killed and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from mlaas4hep.spec import ResourcesSpec, TrainingSpec, parse_spec
from mlaas4hep.train.metrics import evaluate, save_plots
from mlaas4hep.train.trainer import (
    EarlyStopping,
    ResourceError,
    check_resources,
    fit_resources,
    scaling_config,
    split_dataset,
    train_model,
)

N_FEATURES = 8
N_EVENTS = 3000

#: A MLaaS4HEP model file written for Keras 2; the same network as MLP [16].
MODEL_FILE = """\
from tensorflow import keras

def model(idim):
    model = keras.Sequential([
        keras.layers.Dense(16, activation='relu', input_shape=(idim,)),
        keras.layers.Dense(1, activation='sigmoid'),
    ])
    model.compile(loss='binary_crossentropy', optimizer='adam', metrics=['accuracy'])
    return model
"""


def events(n: int = N_EVENTS, seed: int = 0) -> np.ndarray:
    """Rows of N_FEATURES features then the label; signal shifted by +1.5; some NaN padding."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.float32)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32) + 1.5 * y[:, None]
    x[::7, 3] = np.nan  # padded jagged slots reach the trainer as NaN
    return np.concatenate([x, y[:, None]], axis=1)


def make_dataset(rows: np.ndarray, blocks: int = 4):
    """A Ray Dataset with the trainer's columns: ``features`` (tensor) and ``label``."""
    import ray

    # Defined here so Ray ships it by value (test modules are not importable in workers).
    def _columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = batch["data"]
        return {"features": data[:, :-1], "label": data[:, -1]}

    return ray.data.from_numpy(np.array_split(rows, blocks)).map_batches(_columns)


def make_spec(num_workers: int, model, **extra):
    return parse_spec(
        {
            "name": "sync",
            "files": [{"path": "signal.root", "label": 1}],
            "epochs": 3,
            "batch_size": 50,
            "model": model,
            "training": {"shuffle": False, "seed": 7, **extra.pop("training", {})},
            "resources": {"num_workers": num_workers, **extra.pop("resources", {})},
            **extra,
        }
    )


class Epochs:
    """on_epoch recorder; optionally kills the reporting worker once, after one epoch."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.kill_after = kill_after
        self.killed: int | None = None

    def __call__(self, epoch: int, metrics: dict) -> None:
        self.calls.append((epoch, metrics))
        if self.kill_after == epoch and self.killed is None:
            self.killed = int(metrics["pid"])  # the worker process of this test's own run
            os.kill(self.killed, signal.SIGKILL)


def run(tmp_path_factory, ray_cluster, spec, run_id: str, recorder: Epochs):
    splits = split_dataset(make_dataset(events()), spec.training)
    storage = tmp_path_factory.mktemp("train-storage")
    result = train_model(spec, splits, N_FEATURES, str(storage), run_id, on_epoch=recorder)
    # The model folder is the caller's to remove: keep it with the test's temporary files.
    result.model_dir = Path(shutil.move(result.model_dir, storage / "model"))
    return result, storage, recorder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "keras2_model.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, ray_cluster, model_file):
    spec = make_spec(2, str(model_file))
    return run(tmp_path_factory, ray_cluster, spec, "two-workers", Epochs())


@pytest.fixture(scope="module")
def one_worker_mlp(tmp_path_factory, ray_cluster):
    spec = make_spec(1, {"mlp": {"layers": [16]}})
    return run(tmp_path_factory, ray_cluster, spec, "one-worker", Epochs())


# --------------------------------------------------------------------------- synchronization


@pytest.mark.ray
def test_two_workers_end_with_identical_weights(two_workers):
    result, _, _ = two_workers
    reports = result.worker_reports
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    # and the weights did move away from their initial values
    assert result.history[0]["loss"] > result.history[-1]["loss"]


@pytest.mark.ray
def test_two_worker_loss_curve_matches_one_worker_with_same_global_batch(
    two_workers, one_worker_mlp
):
    # Same data, seed, network and global batch: only the worker count differs. Stated
    # tolerance: 2% relative per epoch (batches hold other rows in another order).
    two, one = two_workers[0].history, one_worker_mlp[0].history
    assert len(two) == len(one) == 3
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0.02)


# --------------------------------------------------------------------------- model kinds


@pytest.mark.ray
def test_mlaas4hep_model_file_trains_unchanged_on_two_workers(two_workers):
    result, storage, epochs = two_workers
    assert [e for e, _ in epochs.calls] == [1, 2, 3]
    assert set(epochs.calls[-1][1]) >= {"loss", "accuracy", "auc", "val_loss", "val_auc"}
    assert result.metrics["auc"] > 0.85
    assert result.metrics["n"] > 0.15 * N_EVENTS
    assert sum(map(sum, result.metrics["confusion_matrix"])) == result.metrics["n"]
    assert (result.model_dir / "model.keras").is_file()
    # one checkpoint per epoch under the storage path (the last two kept)
    checkpoints = sorted(p.name for p in (storage / "two-workers").glob("epoch_*"))
    assert checkpoints == ["epoch_00001", "epoch_00002"]


@pytest.mark.ray
def test_declarative_mlp_trains_without_a_model_file(one_worker_mlp):
    result, _, _ = one_worker_mlp
    assert result.metrics["auc"] > 0.85
    assert result.metrics["epochs_run"] == 3
    assert result.history[-1]["val_auc"] > 0.85


@pytest.mark.ray
def test_trained_model_scores_like_the_reported_test_metrics(two_workers):
    import tf_keras

    result, _, _ = two_workers
    model = tf_keras.models.load_model(result.model_dir / "model.keras", compile=False)
    rows = events()
    x, y = np.nan_to_num(rows[:, :-1]), rows[:, -1]
    assert evaluate(y, model(x).numpy())["auc"] == pytest.approx(result.metrics["auc"], abs=0.03)


@pytest.mark.ray
def test_chunk_mode_fits_each_chunk_epochs_times_in_lockstep_on_two_workers(
    tmp_path_factory, ray_cluster
):
    # MLaaS4HEP's per-chunk training: ~1800 training events in chunks of 600 (300 per
    # rank), each fitted 2 times; one report per chunk from both ranks (else the
    # barrier hangs), the same weights on both ranks after the last chunk.
    model = {"mlp": {"layers": [16], "learning_rate": 0.01}}  # few steps: learn fast
    spec = make_spec(2, model, epochs=2, chunk_size=600, training={"mode": "chunk"})
    result, storage, epochs = run(tmp_path_factory, ray_cluster, spec, "chunks", Epochs())
    chunks = [row["chunk"] for row in result.history]
    assert len(chunks) >= 3 and chunks == list(range(len(chunks)))
    assert [e for e, _ in epochs.calls] == [c + 1 for c in chunks]
    per_chunk = np.diff([0, *(row["events"] for row in result.history)])
    assert all(n == 600 for n in per_chunk[:-1]) and 0 < per_chunk[-1] <= 600
    assert sum(per_chunk) <= 0.7 * N_EVENTS  # one pass over the training split
    assert all("val_loss" in row and "val_auc" in row for row in result.history)
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    reports = result.worker_reports
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert reports[0]["chunk"] == reports[1]["chunk"] == chunks[-1]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    assert result.metrics["auc"] > 0.85
    assert save_plots(result.metrics, storage / "plots")[-1].name == "history.png"


# --------------------------------------------------------------------------- failures


@pytest.mark.ray
def test_killed_worker_resumes_from_last_checkpoint_and_stops_early(tmp_path_factory, ray_cluster):
    # min_delta 10: no epoch after the first counts as a gain, so patience 3 stops the run
    # after epoch 4 of 6, but only if the restarted worker restored the stopping state.
    training = {
        "keep": "best",
        "early_stopping_patience": 3,
        "early_stopping_min_delta": 10.0,
        "class_weights": {0: 1.0, 1: 2.0},
        "mixed_precision": True,
    }
    spec = make_spec(
        1, {"mlp": {"layers": [16]}}, epochs=6, resources={"max_failures": 1}, training=training
    )
    result, _, epochs = run(tmp_path_factory, ray_cluster, spec, "resume", Epochs(kill_after=2))
    assert epochs.killed is not None
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert result.worker_reports[0]["stopped_early"] is True
    # epochs 1-2 were not trained again after the restart: reported once each
    reported = [e for e, _ in epochs.calls]
    assert reported.count(1) == 1 and reported.count(4) == 1
    assert result.metrics["auc"] > 0.85
    best = min(result.history, key=lambda row: row["val_loss"])["epoch"]
    assert result.metrics["kept_epoch"] == best


def test_early_stopping_counts_epochs_without_gain():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.update(v) for v in (1.0, 0.5, 0.495, 0.6, 0.4, 0.41, 0.4)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    never = EarlyStopping(patience=0)
    assert not any(never.update(v) for v in (1.0, 2.0, 3.0, 4.0))


# --------------------------------------------------------------------------- resources


@pytest.mark.ray
def test_gpu_request_on_cluster_without_gpus_fails_fast(ray_cluster):
    with pytest.raises(ResourceError) as info:
        check_resources(ResourcesSpec(num_workers=2, use_gpu=True))
    message = str(info.value)
    assert "training asks for 2 worker(s) x {CPU: 1, GPU: 1}" in message
    assert "GPU 2 asked, 0 exist" in message


@pytest.mark.ray
def test_custom_resource_is_asked_for_and_checked(ray_cluster):
    resources = ResourcesSpec(num_workers=2, resources_per_worker={"hep_accelerator": 1})
    config = scaling_config(resources)
    assert config.num_workers == 2
    assert config._resources_per_worker_not_none == {"CPU": 1.0, "hep_accelerator": 1.0}
    assert config.total_resources["hep_accelerator"] == 2.0
    with pytest.raises(ResourceError, match=r"hep_accelerator 2 asked, 0 exist"):
        check_resources(resources)


@pytest.mark.ray
def test_workers_taking_every_cpu_fail_fast(ray_cluster):
    cpus = ray_cluster.cluster_resources()["CPU"]
    with pytest.raises(ResourceError, match=r"leaving 0 of .* CPUs for reading the data"):
        check_resources(ResourcesSpec(num_workers=int(cpus)))
    with pytest.raises(ResourceError, match=r"CPU 200 asked"):
        check_resources(ResourcesSpec(num_workers=100, cpus_per_worker=2))
    check_resources(ResourcesSpec(num_workers=1))


def _node(cpus: float, **others: float) -> dict[str, float]:
    return {"CPU": cpus, "memory": 8e9, **others}


@pytest.mark.parametrize(
    ("nodes", "workers", "cpus"),
    [
        ([_node(2)], 1, 1.0),  # this 2-core machine with no platform up: one worker fits
        ([_node(6)], 2, 1.0),  # the embedded platform's sized head: the default two
        ([_node(1.5)], 1, 0.5),  # less than a CPU left for a worker: a smaller one
        ([_node(1), _node(1)], 1, 1.0),  # one CPU of the two nodes kept for reading
        ([_node(16), _node(16)], 2, 1.0),  # never more than the default unasked
    ],
)
def test_unset_workers_and_cpus_are_chosen_to_fit_the_cluster(nodes, workers, cpus):
    choice = fit_resources(ResourcesSpec(), nodes)
    assert (choice.resources.num_workers, choice.resources.cpus_per_worker) == (workers, cpus)
    total = sum(node["CPU"] for node in nodes)
    assert total - workers * cpus >= 1.0  # a CPU stays free for the Ray Data read tasks
    assert choice.reason.startswith(f"training on {workers} worker(s) x {{CPU: {cpus:g}}}: ")
    assert "num_workers and cpus_per_worker not set" in choice.reason
    assert f"{total:g} CPUs" in choice.reason


def test_unset_worker_count_fits_gpus_and_concurrent_trials():
    gpu = fit_resources(ResourcesSpec(use_gpu=True), [_node(8, GPU=1), _node(8)])
    assert gpu.resources.num_workers == 1  # one node has the one GPU
    trials = fit_resources(ResourcesSpec(), [_node(4)], trials=3)
    assert trials.resources.num_workers == 1 and "each of 3 concurrent trials" in trials.reason


def test_explicit_resources_are_kept_as_asked_even_when_they_cannot_fit():
    asked = ResourcesSpec(num_workers=2, cpus_per_worker=1)
    choice = fit_resources(asked, [_node(2)])
    assert choice.resources == asked and choice.reason is None
    # Set workers keep their count; only the unset CPUs per worker are chosen.
    some = fit_resources(ResourcesSpec(num_workers=3), [_node(2)])
    assert (some.resources.num_workers, some.resources.cpus_per_worker) == (3, 1.0)
    assert "cpus_per_worker not set" in some.reason and "num_workers" not in some.reason


# --------------------------------------------------------------------------- splits


def _rows(ds) -> set[bytes]:
    return {
        row.tobytes()
        for batch in ds.iter_batches(batch_size=1000, batch_format="numpy")
        for row in np.nan_to_num(batch["features"], nan=-999.0)
    }


@pytest.mark.ray
def test_splits_are_disjoint_complete_and_reproducible(ray_cluster):
    rows = events(2000, seed=3)
    training = TrainingSpec(validation_fraction=0.2, test_fraction=0.1, seed=11)
    first = {k: _rows(v) for k, v in split_dataset(make_dataset(rows), training).items()}
    again = {k: _rows(v) for k, v in split_dataset(make_dataset(rows, 3), training).items()}
    assert first == again  # same seed, other block layout: same split
    train, val, test = first["train"], first["validation"], first["test"]
    assert not (train & val or train & test or val & test)
    assert len(train) + len(val) + len(test) == 2000
    assert 0.6 < len(train) / 2000 < 0.8 and 0.15 < len(val) / 2000 < 0.25
    other = split_dataset(make_dataset(rows), training.model_copy(update={"seed": 12}))
    assert _rows(other["test"]) != test


@pytest.mark.ray
def test_split_without_validation_has_no_validation_dataset(ray_cluster):
    training = TrainingSpec(validation_fraction=0.0, test_fraction=0.1)
    splits = split_dataset(make_dataset(events(200)), training)
    assert sorted(splits) == ["test", "train"]
    assert splits["train"].count() + splits["test"].count() == 200


# --------------------------------------------------------------------------- worker feed


class CountingShard:
    """A worker's shard (``iter_batches`` of ``features``/``label`` blocks) counting its reads."""

    def __init__(self, rows: np.ndarray, block: int = 500) -> None:
        self.rows, self.block, self.reads = rows, block, 0

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        self.reads += 1
        for start in range(0, len(self.rows), self.block):
            part = self.rows[start : start + self.block]
            yield {"features": part[:, :-1], "label": part[:, -1]}


def _epoch_rows(ds) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one epoch's batches, in order."""
    batches = list(ds.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_shard_that_fits_is_read_once_then_replayed_reshuffled_with_known_length():
    import tensorflow as tf

    from mlaas4hep.train.trainer import _Budget, _ShardFeed

    rows = events(1200)
    shard = CountingShard(rows)
    feed = _ShardFeed(shard, N_FEATURES, batch_size=100, workers=1, budget=_Budget(10**8))
    first = feed.epoch(seed=(7, 0, 0))
    assert int(first.cardinality()) < 0  # streamed: length unknown
    x0, _ = _epoch_rows(first)
    assert len(x0) == 1200 and not np.isnan(x0).any()
    feed.settle(tf.distribute.get_strategy())

    second, third = feed.epoch(seed=(7, 0, 1)), feed.epoch(seed=(7, 0, 2))
    assert shard.reads == 1  # later epochs come from the cache, not from the files
    assert int(second.cardinality()) == 12  # 1200 rows in batches of 100
    (x1, y1), (x2, _) = _epoch_rows(second), _epoch_rows(third)
    assert not np.array_equal(x1, x2)  # a new permutation every epoch ...
    key = np.lexsort(np.nan_to_num(rows[:, :-1]).T)
    assert np.array_equal(x1[np.lexsort(x1.T)], np.nan_to_num(rows[:, :-1])[key])  # ... same rows
    assert np.array_equal(y1[np.lexsort(x1.T)], rows[:, -1][key])


def test_cached_shard_of_several_workers_hides_its_length_and_keeps_global_batches():
    # tf.distribute then splits each global batch among the workers, as for a stream.
    import tensorflow as tf

    from mlaas4hep.train.trainer import _Budget, _ShardFeed

    feed = _ShardFeed(CountingShard(events(1200)), N_FEATURES, 100, 2, _Budget(10**8))
    _epoch_rows(feed.epoch())
    feed.settle(tf.distribute.get_strategy())
    cached = feed.epoch()
    assert feed.cached is not None and int(cached.cardinality()) < 0
    assert {len(x) for x, _ in cached.as_numpy_iterator()} == {100}


def test_shard_larger_than_the_memory_budget_streams_every_epoch():
    import tensorflow as tf

    from mlaas4hep.train.trainer import _Budget, _ShardFeed

    shard = CountingShard(events(1200))
    budget = _Budget(20_000)  # less than the 1200 x 9 float32 values
    feed = _ShardFeed(shard, N_FEATURES, batch_size=100, workers=1, budget=budget)
    assert len(_epoch_rows(feed.epoch())[0]) == 1200
    feed.settle(tf.distribute.get_strategy())
    again = feed.epoch()
    assert int(again.cardinality()) < 0 and len(_epoch_rows(again)[0]) == 1200
    assert shard.reads == 2 and budget.left == 20_000  # nothing held back


def test_class_weights_become_per_row_sample_weights():
    import tensorflow as tf

    from mlaas4hep.train.trainer import _weighted

    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), np.float32), [0.0, 1.0, 1.0, 0.0]))
    _, _, w = next(iter(_weighted(ds.batch(4), {0: 1.0, 1: 3.0}).as_numpy_iterator()))
    assert w.tolist() == [1.0, 3.0, 3.0, 1.0]


# --------------------------------------------------------------------------- metrics


def test_evaluate_counts_confusion_matrix_and_auc():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.4, 0.6, 0.3, 0.8, 0.9])
    metrics = evaluate(y, s, threshold=0.5)
    assert metrics["confusion_matrix"] == [[2, 1], [1, 2]]
    assert metrics["auc"] == pytest.approx(7 / 9)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["roc"]["fpr"][0] == 0.0 and metrics["roc"]["tpr"][-1] == 1.0
    assert sum(metrics["score_distribution"]["signal"]) == 3
    json.dumps(metrics, allow_nan=False)  # JSON-ready as it is


def test_evaluate_with_one_class_has_no_auc():
    metrics = evaluate([1, 1, 1], [0.2, 0.7, 0.9])
    assert metrics["auc"] is None
    assert metrics["roc"]["fpr"] == []
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        evaluate([0, 1, 1], [0.5, 0.5])


def test_save_plots_writes_png_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.5
    metrics = evaluate(y, np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1))
    metrics["history"] = [
        {"epoch": 0, "loss": 0.6, "val_loss": 0.62, "auc": 0.7, "val_auc": 0.69},
        {"epoch": 1, "loss": 0.5, "val_loss": 0.55, "auc": 0.8, "val_auc": 0.78},
    ]
    paths = save_plots(metrics, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["confusion_matrix.png", "history.png", "roc.png", "scores.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_auc_is_added_to_a_sigmoid_model_and_user_metrics_kept(tmp_path):
    from mlaas4hep.spec import ModelSpec
    from mlaas4hep.train.models import build_model
    from mlaas4hep.train.trainer import _compile

    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    model = build_model(ModelSpec(file=str(path)), N_FEATURES)
    _compile(model)
    rows = events(64)
    history = model.fit(np.nan_to_num(rows[:, :-1]), rows[:, -1], epochs=1, verbose=0)
    assert {"loss", "accuracy", "auc"} <= set(history.history)
    assert type(model.optimizer).__name__ == "Adam"


def test_auc_is_not_forced_on_a_two_class_softmax_model(tmp_path):
    from mlaas4hep.spec import ModelSpec
    from mlaas4hep.train.models import build_model
    from mlaas4hep.train.trainer import _compile

    path = tmp_path / "softmax.py"
    path.write_text(
        MODEL_FILE.replace(
            "Dense(1, activation='sigmoid')", "Dense(2, activation='softmax')"
        ).replace("binary_crossentropy", "sparse_categorical_crossentropy")
    )
    model = build_model(ModelSpec(file=str(path)), N_FEATURES)
    _compile(model)
    rows = events(64)
    history = model.fit(np.nan_to_num(rows[:, :-1]), rows[:, -1], epochs=1, verbose=0)
    assert "auc" not in history.history and "accuracy" in history.history


@pytest.mark.ray
def test_broken_model_file_fails_in_the_sandbox_before_any_worker_starts(ray_cluster, tmp_path):
    from mlaas4hep.train.model_file import ModelSourceError

    path = tmp_path / "broken.py"
    path.write_text("from tensorflow import keras\n\ndef model(idim):\n    return keras.Nope()\n")
    spec = make_spec(2, str(path))
    storage = tmp_path / "storage"
    expected = rf"{path}, line 4: model\(8\) raised AttributeError"
    with pytest.raises(ModelSourceError, match=expected):
        train_model(spec, {"train": make_dataset(events(100))}, N_FEATURES, str(storage), "bad")
    assert not (storage / "bad").exists()  # Ray Train never started the run


@pytest.mark.ray
def test_model_file_with_a_lambda_layer_fails_before_any_worker_starts(ray_cluster, tmp_path):
    from mlaas4hep.modelfiles.safety import UnsafeModelError

    path = tmp_path / "lambda_model.py"
    path.write_text(
        MODEL_FILE.replace(
            "keras.layers.Dense(1,",
            "keras.layers.Lambda(lambda x: x),\n        keras.layers.Dense(1,",
        )
    )
    spec = make_spec(1, str(path))
    storage = tmp_path / "storage"
    with pytest.raises(UnsafeModelError, match=rf"{path}: .*Lambda"):
        train_model(spec, {"train": make_dataset(events(100))}, N_FEATURES, str(storage), "lam")
    assert not (storage / "lam").exists()
