"""Distributed training on Ray Train: one TensorFlow process per worker, synchronized.

:func:`train_model` runs a ``TensorflowTrainer`` whose workers each read their own
streaming shard of the training data (``ray.train.get_dataset_shard``) and fit the model
under ``MultiWorkerMirroredStrategy``: gradients are all-reduced every step, so every
rank holds the same weights. Each epoch every rank reports its metrics (a barrier in Ray
Train V2) and rank 0 adds a checkpoint (``model.keras`` + ``state.json``) under the
storage path; a restarted run resumes from the latest one. The test split is then
scored in the driver batch by batch.

In ``chunk`` mode (MLaaS4HEP's workflow) each worker streams its shard in chunks of
``chunk_size / num_workers`` events, fits each chunk ``epochs`` times, then moves on:
one pass over the data, one report (and checkpoint) per chunk.

Legacy Keras (``tf_keras``) is used because Keras 3 fails under
``MultiWorkerMirroredStrategy`` in Ray Train; ``TF_USE_LEGACY_KERAS=1`` is set here
before TensorFlow loads, and again in each worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlaas4hep.platform.config import ModelSpec, PipelineSpec, ResourcesSpec, TrainingSpec
from mlaas4hep.train.metrics import evaluate
from mlaas4hep.train.models import build_model, read_model_source

os.environ["TF_USE_LEGACY_KERAS"] = "1"

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

#: Rows scored per batch when evaluating the test split in the driver.
EVAL_BATCH_SIZE = 8192
#: Split names :func:`split_dataset` returns and :func:`train_model` reads.
SPLITS = ("train", "validation", "test")
#: Environment every training worker gets (legacy Keras before TensorFlow loads).
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1"}


class ResourceError(RuntimeError):
    """The training asks for more than the Ray cluster has; says what was asked and what exists."""


class TrainingError(RuntimeError):
    """A training run that failed; the message carries the workers' error."""


# --------------------------------------------------------------------------- data splits


_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)


def _row_uniform(features: np.ndarray, labels: np.ndarray | None, seed: int) -> np.ndarray:
    """A number in [0, 1) per row, a hash of the row's values and ``seed``.

    Depends only on a row's content, never on block order or the process, so a split is
    reproducible under streaming execution and the same event always lands in the same
    split.
    """
    rows = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)
    bits = rows.view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.full(len(rows), np.uint64(seed % 2**64) * _MIX + np.uint64(1), dtype=np.uint64)
        for column in bits.T:
            h = (h ^ column) * _PRIME
        if labels is not None:
            h = (h ^ np.asarray(labels, dtype=np.float32).view(np.uint32)) * _PRIME
        # splitmix64 finalizer: spreads the FNV-style state over all bits.
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _SplitFilter:
    """Keep the rows whose hash falls in ``[low, high)`` (a Ray Data ``map_batches`` function)."""

    def __init__(self, low: float, high: float, seed: int) -> None:
        self.low, self.high, self.seed = low, high, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        u = _row_uniform(batch["features"], batch.get("label"), self.seed)
        keep = (u >= self.low) & (u < self.high)
        return {name: column[keep] for name, column in batch.items()}


def split_dataset(ds: ray.data.Dataset, training: TrainingSpec) -> dict[str, ray.data.Dataset]:
    """Split ``ds`` into ``"train"``, ``"validation"`` and ``"test"`` datasets.

    Rows are assigned by a seeded hash of their content (``training.seed``), so the
    splits are disjoint, reproducible and computed while streaming (nothing is
    materialized). A split whose fraction is 0 is left out.
    """
    bounds = {
        "test": (0.0, training.test_fraction),
        "validation": (
            training.test_fraction,
            training.test_fraction + training.validation_fraction,
        ),
        "train": (training.test_fraction + training.validation_fraction, 1.0),
    }
    return {
        name: ds.map_batches(_SplitFilter(low, high, training.seed), batch_format="numpy")
        for name, (low, high) in bounds.items()
        if high > low
    }


def to_model_input(features: np.ndarray) -> np.ndarray:
    """Model input of a ``features`` batch: float32 with padded (NaN) slots set to 0."""
    try:
        from mlaas4hep.platform.flatten import to_model_input as flatten_input
    except ImportError:
        return np.nan_to_num(np.asarray(features, dtype=np.float32), nan=0.0)
    return flatten_input(features)


# --------------------------------------------------------------------------- resources


def worker_resources(resources: ResourcesSpec) -> dict[str, float]:
    """Ray resources one training worker asks for."""
    ask = {"CPU": float(resources.cpus_per_worker)}
    if resources.use_gpu:
        ask["GPU"] = float(resources.gpus_per_worker or 1.0)
    ask.update({k: float(v) for k, v in resources.resources_per_worker.items()})
    return {k: v for k, v in ask.items() if v > 0}


def scaling_config(resources: ResourcesSpec):
    """The Ray Train ``ScalingConfig`` of ``resources``."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.use_gpu,
        resources_per_worker=worker_resources(resources),
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


#: Set on an autoscaling cluster (KubeRay): today's nodes are not all the cluster can have.
AUTOSCALING_ENV = "MLAAS4HEP_AUTOSCALING"


def check_resources(resources: ResourcesSpec, *, data_cpus: float = 1.0) -> None:
    """Raise :class:`ResourceError` at once if the training can never be placed.

    Skipped when ``MLAAS4HEP_AUTOSCALING`` is true: the autoscaler adds the nodes.

    Checks the cluster's totals (not what is free now: a busy cluster queues, a too
    small one would wait forever): every worker must fit on one node, all workers
    together in the cluster, and ``data_cpus`` CPUs must stay free for the Ray Data
    tasks that stream the data to the workers.
    """
    import ray

    if not ray.is_initialized():
        raise ResourceError("no Ray cluster: call ray.init() (or start the platform) first")
    if os.environ.get(AUTOSCALING_ENV, "").lower() in {"1", "true", "yes"}:
        return  # the autoscaler starts the nodes asked for (GPU groups scale from zero)
    per_worker = worker_resources(resources)
    n = resources.num_workers
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    asked = f"training asks for {n} worker(s) x {_fmt(per_worker)}"
    has = "the cluster has " + _fmt({k: total.get(k, 0.0) for k in sorted(per_worker)})
    short = [
        f"{k} {v * n:g} asked, {total.get(k, 0.0):g} exist"
        for k, v in per_worker.items()
        if total.get(k, 0.0) + 1e-9 < v * n
    ]
    if short:
        raise ResourceError(f"{asked}, but {has}: " + "; ".join(short))
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in per_worker.items()) for node in nodes):
        largest = max(nodes, key=lambda node: node.get("CPU", 0.0), default={})
        raise ResourceError(
            f"{asked}, but no single node has that much (largest node: "
            f"{_fmt({k: largest.get(k, 0.0) for k in per_worker})})"
        )
    left = total.get("CPU", 0.0) - per_worker.get("CPU", 0.0) * n
    if left + 1e-9 < data_cpus:
        raise ResourceError(
            f"{asked}, leaving {left:g} of {total.get('CPU', 0.0):g} CPUs for reading the data "
            f"({data_cpus:g} needed): use fewer workers or fewer CPUs per worker"
        )


# --------------------------------------------------------------------------- worker loop


def _weights_digest(weights: list[np.ndarray]) -> str:
    """sha256 of a model's weights (identical across ranks when training is synchronized)."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _tf_dataset(iterator, n_features: int, batch_size: int, shuffle_seed: int | None):
    """A ``tf.data.Dataset`` of (features, label) batches over a worker's shard."""
    import tensorflow as tf

    local_shuffle = max(4 * batch_size, 1024) if shuffle_seed is not None else None
    ds = iterator.to_tf(
        feature_columns="features",
        label_columns="label",
        batch_size=batch_size,
        local_shuffle_buffer_size=local_shuffle,
        local_shuffle_seed=shuffle_seed,
        feature_type_spec=tf.TensorSpec(shape=(None, n_features), dtype=tf.float32),
        label_type_spec=tf.TensorSpec(shape=(None,), dtype=tf.float32),
    )

    def clean(x, y):
        return tf.where(tf.math.is_nan(x), tf.zeros_like(x), x), y

    # to_tf turns auto-sharding off already: each worker's shard is its own.
    return ds.map(clean)


def _with_auc(model) -> None:
    """Recompile ``model`` keeping the user's loss/optimizer/metrics and adding ``auc``."""
    import tf_keras

    config = getattr(getattr(model, "_compile_config", None), "config", None)
    outputs = getattr(model, "outputs", None) or []
    if not config or len(outputs) != 1 or outputs[0].shape[-1] != 1:
        return  # AUC of one sigmoid score only; other heads keep the user's metrics
    metrics = list(config.get("metrics") or [])
    if any(getattr(m, "name", m) == "auc" for m in metrics):
        return
    config = dict(
        config, optimizer=model.optimizer, metrics=[*metrics, tf_keras.metrics.AUC(name="auc")]
    )
    model.compile(**config)


def _agree(strategy, value: float, reduce: str = "mean") -> float:
    """``value`` reduced over all replicas of all workers: their ``mean`` or ``min``.

    A collective: every rank calls it, in the same order.
    """
    import tensorflow as tf

    per_replica = strategy.run(lambda: tf.constant([value], dtype=tf.float32))
    if reduce == "min":
        return float(tf.reduce_min(strategy.gather(per_replica, axis=0)))
    return float(strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=0))


@dataclass
class EarlyStopping:
    """Stop once the monitored loss has not fallen by more than ``min_delta`` for
    ``patience`` epochs in a row (``patience`` 0: never stop)."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    stale: int = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; return whether training should stop now."""
        if value < self.best - self.min_delta:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.patience > 0 and self.stale >= self.patience


def _restore(model) -> tuple[int, list[dict[str, float]]]:
    """Load the latest Ray Train checkpoint into ``model``; return (next epoch, history)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        model.load_weights(os.path.join(folder, "model.keras"))
        state = json.loads(Path(folder, "state.json").read_text())
    logger.info("resuming after epoch %d from %s", state["epoch"], checkpoint.path)
    return state["epoch"] + 1, state["history"]


def _report_step(model, rank: int, step: int, row: dict[str, Any], history, stop: bool) -> None:
    """Report one epoch (or chunk) from every rank; rank 0 attaches the checkpoint."""
    import ray.train

    weights = model.get_weights()
    report = {
        **row,
        "rank": rank,
        "pid": os.getpid(),
        "weights_sha256": _weights_digest(weights),
        "weights_sum": float(sum(np.sum(w, dtype=np.float64) for w in weights)),
        "stopped_early": stop,
    }
    with tempfile.TemporaryDirectory(prefix="mlaas4hep-ckpt-") as folder:
        # Every rank saves (saving may read synchronized variables); only rank 0's is kept.
        model.save(os.path.join(folder, "model.keras"))
        checkpoint = None
        if rank == 0:
            Path(folder, "state.json").write_text(json.dumps({"epoch": step, "history": history}))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{step:05d}")


def _last(fit) -> dict[str, float]:
    """The last value of each metric of a ``model.fit`` history."""
    return {k: float(v[-1]) for k, v in fit.history.items() if len(v)}


def _chunks(shard, rows: int):
    """(features, labels) numpy chunks of ``rows`` rows streamed from a worker's shard."""
    for batch in shard.iter_batches(batch_size=rows, batch_format="numpy"):
        yield to_model_input(batch["features"]), np.asarray(batch["label"], dtype=np.float32)


def _agreed_chunks(strategy, shard, rows: int, world: int):
    """This rank's chunks, cut so that every rank fits the same number of rows.

    Yields ``(features, labels, events)``, ``events`` counting the rows of all ranks so
    far. Shards differ by a few rows at most: each chunk is cut to the smallest one
    among the ranks, and all ranks stop at the first rank without data (a collective
    per chunk: every rank iterates to the end together).
    """
    chunks, events = _chunks(shard, rows), 0
    while True:
        x, y = next(chunks, (np.empty((0, 0), np.float32), np.empty(0, np.float32)))
        n = int(_agree(strategy, float(len(x)), reduce="min"))
        if n == 0:
            return
        events += n * world
        yield x[:n], y[:n], events


def _chunk_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None):
    """A ``tf.data.Dataset`` of one in-memory chunk, not auto-sharded (the chunk is this rank's)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if seed is not None:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.batch(batch_size).with_options(options)


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: fit under MultiWorkerMirroredStrategy, report per step.

    A step is an epoch over the whole shard (``standard`` mode) or one chunk fitted
    ``epochs`` times (``chunk`` mode). Every rank takes the same steps and reports each.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import ray.train
    import tensorflow as tf
    import tf_keras

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    training = TrainingSpec.model_validate(config["training"])
    if config.get("threads"):
        tf.config.threading.set_intra_op_parallelism_threads(config["threads"])
    tf_keras.utils.set_random_seed(training.seed)
    if training.mixed_precision:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        tf_keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    n_features = config["n_features"]
    with strategy.scope():
        model = build_model(
            ModelSpec.model_validate(config["model"]), n_features, source=config["model_source"]
        )
        _with_auc(model)
    start, history = _restore(model)

    batch_size = config["batch_size"]
    seed = training.seed + rank if training.shuffle else None
    validation = (
        _tf_dataset(ray.train.get_dataset_shard("validation"), n_features, batch_size, None)
        if config["has_validation"]
        else None
    )
    class_weight = {int(k): float(v) for k, v in (training.class_weights or {}).items()} or None
    monitor = "val_loss" if validation is not None else "loss"
    stopper = EarlyStopping(training.early_stopping_patience, training.early_stopping_min_delta)
    for row in history:  # resumed: the same state on every rank (rank 0's checkpoint)
        stopper.update(row.get(monitor, math.inf))

    def finish_step(step: int, row: dict[str, Any]) -> bool:
        history.append(row)
        # Every rank must take the same decision, or the next collective hangs.
        stop = stopper.update(_agree(strategy, row.get(monitor, math.inf)))
        _report_step(model, rank, step, row, history, stop)
        return stop

    shard = ray.train.get_dataset_shard("train")
    if training.mode == "chunk":
        world = ctx.get_world_size()
        rows = max(1, config["chunk_size"] // world)
        for step, (x, y, events) in enumerate(_agreed_chunks(strategy, shard, rows, world)):
            if step < start:  # resumed: chunks fitted before the restart are skipped
                continue
            fit = model.fit(
                _chunk_dataset(x, y, batch_size, seed),
                validation_data=validation,
                validation_freq=config["epochs"],
                epochs=config["epochs"],
                verbose=0,
                class_weight=class_weight,
            )
            if finish_step(step, {"chunk": step, "events": events, **_last(fit)}):
                break
        return

    train = _tf_dataset(shard, n_features, batch_size, seed)
    for epoch in range(start, config["epochs"]):
        fit = model.fit(
            train, validation_data=validation, epochs=1, verbose=0, class_weight=class_weight
        )
        if finish_step(epoch, {"epoch": epoch, **_last(fit)}):
            break


# --------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    #: Local folder holding ``model.keras`` (the kept epoch's model).
    model_dir: Path
    #: One row per epoch (rank 0): ``epoch``, ``loss``, ``accuracy``, ``auc``, ``val_*``;
    #: in ``chunk`` mode one row per chunk, with ``chunk`` and ``events`` (seen so far).
    history: list[dict[str, float]]
    #: Test-split metrics from :func:`mlaas4hep.train.metrics.evaluate` plus ``history``,
    #: ``epochs_run``, ``kept_epoch`` and ``num_workers``.
    metrics: dict[str, Any]
    #: The last report of each rank (``weights_sha256`` proves synchronized weights).
    worker_reports: list[dict[str, Any]] = field(default_factory=list)
    #: Where Ray Train kept the checkpoints (a storage path or URI).
    checkpoint_path: str | None = None


def _progress_callback(queue):
    """A Ray Train callback (runs in the Train controller) forwarding reports to ``queue``."""
    from ray.train import UserCallback

    class _Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put({"ranks": list(metrics)})

    return _Progress()


#: Report keys that describe the worker, not the model's training.
WORKER_KEYS = frozenset({"rank", "pid", "weights_sha256", "weights_sum", "stopped_early"})


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k not in {"rank", "epoch", "chunk"}
    }


def epoch_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The training metrics of an ``on_epoch`` report (``loss``, ``auc``, ``val_loss``, ...),
    without the worker's bookkeeping (pid, weight digests)."""
    return {k: v for k, v in metrics.items() if k not in WORKER_KEYS}


def _step(row: dict[str, Any]) -> int:
    """Index of a report's step: its epoch, or its chunk in ``chunk`` mode."""
    return int(row.get("epoch", row.get("chunk", 0)))


def _model_source(model_spec: ModelSpec) -> str | None:
    return read_model_source(model_spec.file) if model_spec.file else None


def _fit(trainer, queue, on_epoch) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``trainer.fit()`` in a thread, relaying per-epoch reports to ``on_epoch``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="mlaas4hep-train", daemon=True)
    thread.start()
    last: list[dict[str, Any]] = []
    while True:
        done = not thread.is_alive()
        while not queue.empty():
            ranks = queue.get()["ranks"]
            last = ranks
            if on_epoch is not None and ranks:
                try:
                    on_epoch(_step(ranks[0]) + 1, _scalars(ranks[0]))
                except Exception:
                    logger.exception("on_epoch callback failed")
        if done:
            break
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise TrainingError(f"training failed: {outcome['error']}") from outcome["error"]
    return outcome["result"], last


def _kept_checkpoint(result, keep: str, monitor: str):
    """The checkpoint to keep: the latest, or the one with the lowest ``monitor``."""
    if keep == "best" and result.best_checkpoints:
        scored = [(m.get(monitor, math.inf), c) for c, m in result.best_checkpoints]
        return min(scored, key=lambda item: item[0])[1]
    return result.checkpoint


def _history(result) -> list[dict[str, float]]:
    """The full history, from the latest checkpoint's ``state.json``."""
    with result.checkpoint.as_directory() as folder:
        return json.loads(Path(folder, "state.json").read_text())["history"]


def score_dataset(model, ds: ray.data.Dataset, batch_size: int = EVAL_BATCH_SIZE):
    """Labels and model scores of ``ds``, streamed batch by batch (never collected whole)."""
    labels, scores = [], []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        x = to_model_input(batch["features"])
        if len(x) == 0:
            continue
        scores.append(
            np.asarray(model(x, training=False), dtype=np.float64).reshape(len(x), -1)[:, -1]
        )
        labels.append(np.asarray(batch["label"], dtype=np.float64).reshape(-1))
    if not scores:
        return np.empty(0), np.empty(0)
    return np.concatenate(labels), np.concatenate(scores)


def train_model(
    spec: PipelineSpec,
    datasets: dict[str, ray.data.Dataset],
    n_features: int,
    storage_path: str,
    run_id: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``spec.model`` on ``datasets["train"]`` with ``spec.resources.num_workers`` workers.

    ``datasets`` holds Ray Datasets with ``features`` (float32, ``n_features`` wide, NaN
    padding allowed) and ``label`` (0/1) columns, keyed ``train`` and optionally
    ``validation`` and ``test``. ``spec.batch_size`` is the global batch (shared by the
    workers). Checkpoints go under ``storage_path/run_id``; ``on_epoch(epoch, metrics)``
    is called in this process after each epoch (epochs count from 1; in ``chunk`` mode,
    after each chunk, which it counts). A run started again with the same ``run_id`` and
    ``storage_path`` resumes from the latest checkpoint there. Returns the kept
    model, the history and the test metrics.

    Raises :class:`ResourceError` when the cluster can never place the workers,
    :class:`~mlaas4hep.train.models.ModelFileError` for a broken model file (both before
    any worker starts) and :class:`TrainingError` when the run fails.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.queue import Queue

    if "train" not in datasets:
        raise ValueError(f"no 'train' dataset among {sorted(datasets)}")
    check_resources(spec.resources)
    source = _model_source(spec.model)
    # Built once here so a broken model file fails now, naming its file and line,
    # rather than after the workers have started.
    build_model(spec.model, int(n_features), source=source)
    has_validation = "validation" in datasets
    config = {
        "model": spec.model.model_dump(mode="json"),
        "model_source": source,
        "training": spec.training.model_dump(mode="json"),
        "n_features": int(n_features),
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "chunk_size": spec.chunk_size,
        "has_validation": has_validation,
        "threads": max(1, int(spec.resources.cpus_per_worker)),
    }
    monitor = "val_loss" if has_validation else "loss"
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TensorflowTrainer(
        _train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config(spec.resources),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=None if spec.training.keep == "best" else 2
            ),
            callbacks=[_progress_callback(queue)],
            worker_runtime_env={"env_vars": dict(WORKER_ENV)},
        ),
        datasets={k: v for k, v in datasets.items() if k in ("train", "validation")},
    )
    try:
        result, last_reports = _fit(trainer, queue, on_epoch)
    finally:
        queue.shutdown()
    checkpoint = _kept_checkpoint(result, spec.training.keep, monitor)
    if checkpoint is None:
        raise TrainingError(f"run {run_id}: training ended without a checkpoint")
    model_dir = Path(tempfile.mkdtemp(prefix=f"mlaas4hep-model-{run_id}-"))
    checkpoint.to_directory(str(model_dir))
    kept = json.loads((model_dir / "state.json").read_text())
    history = kept["history"] if checkpoint.path == result.checkpoint.path else _history(result)

    metrics: dict[str, Any] = {}
    if "test" in datasets:
        import tf_keras

        model = tf_keras.models.load_model(model_dir / "model.keras", compile=False)
        y, s = score_dataset(model, datasets["test"])
        if len(y):
            metrics = evaluate(y, s)
        else:
            logger.warning("run %s: the test split is empty; no test metrics", run_id)
    metrics.update(
        history=history,
        epochs_run=len(history),
        kept_epoch=kept["epoch"],
        num_workers=spec.resources.num_workers,
    )
    return TrainResult(
        model_dir=model_dir,
        history=history,
        metrics=metrics,
        worker_reports=last_reports,
        checkpoint_path=result.path if hasattr(result, "path") else None,
    )


def remove_model_dir(result: TrainResult) -> None:
    """Delete the local model folder of ``result`` once it has been bundled."""
    shutil.rmtree(result.model_dir, ignore_errors=True)
