"""Distributed training on Ray Train: one TensorFlow process per worker, synchronized.

:func:`train_model` runs a ``TensorflowTrainer`` whose workers each read their own
streaming shard of the training data (``ray.train.get_dataset_shard``) and fit the model
under ``MultiWorkerMirroredStrategy``: gradients are all-reduced every step, so every
rank holds the same weights. Each epoch every rank reports its metrics (a barrier in Ray
Train V2) and rank 0 adds a checkpoint (``model.keras`` + ``state.json``) under the
storage path; a restarted run resumes from the latest one. The test split is then
scored in the driver batch by batch.

Each worker pulls its shard in large blocks and rebatches them inside ``tf.data`` (no
Python per batch). The first epoch streams; a worker keeps its flattened shard in memory
when it fits (``training.cache``), so later epochs neither re-read nor re-flatten the
ROOT files and run several steps per call into TensorFlow. A shard too large for memory
is streamed again every epoch, in bounded memory.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlaas4hep.spec import (
    DEFAULT_CPUS_PER_WORKER,
    DEFAULT_WORKERS,
    ModelSpec,
    PipelineSpec,
    ResourcesSpec,
    TrainingSpec,
)
from mlaas4hep.train.metrics import evaluate
from mlaas4hep.train.models import build_model, model_archive

os.environ["TF_USE_LEGACY_KERAS"] = "1"

if TYPE_CHECKING:
    import ray.data
    import tensorflow as tf

logger = logging.getLogger(__name__)

#: Rows scored per batch when evaluating the test split in the driver.
EVAL_BATCH_SIZE = 8192
#: Split names :func:`split_dataset` returns and :func:`train_model` reads.
SPLITS = ("train", "validation", "test")
#: Environment every training worker gets (legacy Keras before TensorFlow loads).
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1"}
#: Bytes of features a worker pulls from its Ray Data shard at a time (rebatched in tf.data).
FEED_BLOCK_BYTES = 8 << 20
#: Share of a node's free memory its training workers may fill with their cached shards.
CACHE_MEMORY_FRACTION = 0.25
#: Training steps per call into TensorFlow once an epoch's length is known.
STEPS_PER_EXECUTION = 32
#: Ray Train's controller polling interval (s) unless set: at Ray's default (2 s) every
#: report waits for the next poll, which dominates epochs of a few seconds.
CONTROLLER_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


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
        from mlaas4hep.data.flatten import to_model_input as flatten_input
    except ImportError:
        return np.nan_to_num(np.asarray(features, dtype=np.float32), nan=0.0)
    return flatten_input(features)


# --------------------------------------------------------------------------- resources


def worker_resources(resources: ResourcesSpec) -> dict[str, float]:
    """Ray resources one training worker asks for."""
    ask = {"CPU": float(resources.worker_cpus)}
    if resources.use_gpu:
        ask["GPU"] = float(resources.gpus_per_worker or 1.0)
    ask.update({k: float(v) for k, v in resources.resources_per_worker.items()})
    return {k: v for k, v in ask.items() if v > 0}


def scaling_config(resources: ResourcesSpec):
    """The Ray Train ``ScalingConfig`` of ``resources``."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=resources.workers,
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
    n = resources.workers
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
    nodes = _alive_nodes()
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


def _alive_nodes() -> list[dict[str, float]]:
    """The resources of each alive node of the connected Ray cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


@dataclass(frozen=True)
class ResourceChoice:
    """Resources with every worker count and size set, and why (None: the spec set them)."""

    resources: ResourcesSpec
    reason: str | None


def fit_resources(
    resources: ResourcesSpec,
    nodes: list[dict[str, float]],
    *,
    data_cpus: float = 1.0,
    trials: int = 1,
) -> ResourceChoice:
    """Fill in what ``resources`` leaves unset (``num_workers``, ``cpus_per_worker``) so
    that it fits the cluster of ``nodes`` (each node's Ray resources).

    An unset ``cpus_per_worker`` is :data:`DEFAULT_CPUS_PER_WORKER` (less when no node
    has that much, or when nothing else leaves ``data_cpus`` free); an unset
    ``num_workers`` is as many as the nodes can place, at most :data:`DEFAULT_WORKERS`,
    while ``data_cpus`` CPUs stay free for reading the data, counting ``trials``
    concurrent Tune trials, and at least 1. What the spec set is kept as it is, so an
    explicit request that cannot fit still fails in :func:`check_resources`.
    """
    if resources.num_workers is not None and resources.cpus_per_worker is not None:
        return ResourceChoice(resources, None)
    total = sum(node.get("CPU", 0.0) for node in nodes)
    largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    cpus = resources.cpus_per_worker
    if cpus is None:
        cpus = min(DEFAULT_CPUS_PER_WORKER, largest) if largest > 0 else DEFAULT_CPUS_PER_WORKER
        if resources.num_workers is None and total - data_cpus > 0:
            cpus = min(cpus, (total - data_cpus) / trials)  # one worker still fits
    workers = resources.num_workers
    if workers is None:
        per_worker = worker_resources(resources.model_copy(update={"cpus_per_worker": cpus}))
        placeable = sum(
            min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items())
            for node in nodes
        )
        room = math.floor((total - data_cpus) / cpus + 1e-9) if cpus > 0 else 0
        workers = max(1, min(DEFAULT_WORKERS, placeable // trials, room // trials))
    chosen = resources.model_copy(update={"num_workers": workers, "cpus_per_worker": cpus})
    return ResourceChoice(chosen, _choice_reason(resources, chosen, nodes, data_cpus, trials))


def _choice_reason(
    asked: ResourcesSpec,
    chosen: ResourcesSpec,
    nodes: list[dict[str, float]],
    data_cpus: float,
    trials: int,
) -> str:
    """The run log's line on what :func:`fit_resources` chose and why."""
    unset = [k for k in ("num_workers", "cpus_per_worker") if getattr(asked, k) is None]
    total = sum(node.get("CPU", 0.0) for node in nodes)
    largest = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    each = f" for each of {trials} concurrent trials" if trials > 1 else ""
    return (
        f"training on {chosen.workers} worker(s) x {_fmt(worker_resources(chosen))}{each}: "
        f"{' and '.join(unset)} not set, so chosen to fit the cluster ({len(nodes)} node(s), "
        f"{total:g} CPUs, the largest {largest:g}) keeping {data_cpus:g} CPU free for reading "
        f"the data (at most {DEFAULT_WORKERS} workers x {DEFAULT_CPUS_PER_WORKER:g} CPU)"
    )


def choose_resources(resources: ResourcesSpec, *, trials: int = 1) -> ResourceChoice:
    """:func:`fit_resources` against the connected Ray cluster. On an autoscaling cluster
    (``MLAAS4HEP_AUTOSCALING``) unset values take their defaults: the autoscaler adds nodes."""
    if os.environ.get(AUTOSCALING_ENV, "").lower() in {"1", "true", "yes"}:
        chosen = resources.model_copy(
            update={"num_workers": resources.workers, "cpus_per_worker": resources.worker_cpus}
        )
        reason = None if chosen == resources else "autoscaling cluster: the default resources"
        return ResourceChoice(chosen, reason)
    return fit_resources(resources, _alive_nodes(), trials=trials)


def fitted_to_cluster(spec: PipelineSpec, log: logging.Logger = logger) -> PipelineSpec:
    """``spec`` with its resources fitted to the connected cluster (:func:`choose_resources`),
    the choice logged to ``log``; ``spec`` itself when it set them all."""
    trials = spec.tune.max_concurrent_trials if spec.tune else 1
    choice = choose_resources(spec.resources, trials=trials)
    if choice.reason is None:
        return spec
    log.info("%s", choice.reason)
    return spec.model_copy(update={"resources": choice.resources})


# --------------------------------------------------------------------------- worker loop


def _weights_digest(weights: list[np.ndarray]) -> str:
    """sha256 of a model's weights (identical across ranks when training is synchronized)."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _no_shard(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with tf.distribute's auto-sharding off: a worker's data is already its own."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


#: Seed of one epoch's shuffle: (spec seed, rank, epoch); None keeps the stored order.
Seed = tuple[int, ...] | None


def _rows(x: tf.Tensor, y: tf.Tensor, batch_size: int, seed: Seed, workers: int) -> tf.data.Dataset:
    """Batches of the in-memory rows ``x``, ``y``, gathered a batch at a time; with a
    ``seed`` in a new order at every pass.

    One worker: a dataset of known length (several steps per call into TensorFlow). More
    workers: its length is hidden, as a stream's, so that tf.distribute splits each
    global batch among the workers and each one goes through all its rows.
    """
    import tensorflow as tf

    index = tf.data.Dataset.range(len(y))
    if seed is not None:
        shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        index = index.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = index.batch(batch_size).map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
    return _no_shard(ds if workers == 1 else ds.filter(lambda *_: True))


@dataclass
class _Budget:
    """Bytes the worker may still keep in memory for its cached shards."""

    left: int

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) when they do not fit."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` reserved earlier."""
        self.left += nbytes


class _ShardFeed:
    """A worker's shard of one Ray Dataset as tf.data input, streamed then cached.

    Blocks of ``FEED_BLOCK_BYTES`` come from Ray Data, NaN padding is set to 0 and they
    are rebatched in tf.data. The first pass keeps the blocks while ``budget`` allows;
    :meth:`settle` (a collective) then switches every rank to its cached rows, or every
    rank back to streaming when one of them could not keep its shard.
    """

    def __init__(
        self, shard: Any, n_features: int, batch_size: int, workers: int, budget: _Budget | None
    ) -> None:
        self.shard, self.n_features = shard, n_features
        self.batch_size, self.workers = batch_size, workers
        self.block_rows = max(batch_size, FEED_BLOCK_BYTES // (4 * max(1, n_features)))
        self.budget: _Budget | None = budget
        self.blocks: list[tuple[np.ndarray, np.ndarray]] | None = [] if budget else None
        self.passed: int | None = None  # rows of a complete first pass
        self.settled = False
        self.cached = None  # (features, labels) tensors once settled on the cache

    def _drop_blocks(self) -> None:
        if self.blocks:
            self.budget.give(sum(x.nbytes + y.nbytes for x, y in self.blocks))
        self.blocks = None

    def _stream(self, seed: Seed) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = None if seed is None else np.random.default_rng(seed)
        rows = 0
        for batch in self.shard.iter_batches(
            batch_size=self.block_rows, batch_format="numpy", prefetch_batches=2
        ):
            x = to_model_input(batch["features"])
            y = np.asarray(batch["label"], dtype=np.float32).reshape(-1)
            if self.blocks is not None and self.passed is None:
                if self.budget.take(x.nbytes + y.nbytes):
                    self.blocks.append((x, y))
                else:
                    self._drop_blocks()  # does not fit: stream every epoch
            if rng is not None:  # shuffle within the block; blocks come in stream order
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            rows += len(x)
            yield x, y
        if self.passed is None:
            self.passed = rows

    def epoch(
        self, seed: Seed = None, class_weight: dict[int, float] | None = None
    ) -> tf.data.Dataset:
        """This epoch's batches (of the global batch size); ``seed`` shuffles."""
        import tensorflow as tf

        if self.cached is not None:
            ds = _rows(*self.cached, self.batch_size, seed, self.workers)
        else:
            spec = (
                tf.TensorSpec(shape=(None, self.n_features), dtype=tf.float32),
                tf.TensorSpec(shape=(None,), dtype=tf.float32),
            )
            ds = tf.data.Dataset.from_generator(lambda: self._stream(seed), output_signature=spec)
            ds = _no_shard(ds.rebatch(self.batch_size))
        return _weighted(ds, class_weight).prefetch(tf.data.AUTOTUNE)

    def settle(self, strategy: tf.distribute.Strategy) -> None:
        """Once, after the first pass, on every rank (a collective): read the caches from
        now on if every rank holds its whole shard, else stream every epoch."""
        import tensorflow as tf

        if self.settled:
            return
        self.settled = True
        complete = self.blocks is not None and self.passed
        rows = int(_agree(strategy, float(self.passed if complete else -1), reduce="min"))
        if rows > 0:  # the same rows on every rank: the same steps, no collective left waiting
            x = np.concatenate([b[0] for b in self.blocks])[:rows]
            y = np.concatenate([b[1] for b in self.blocks])[:rows]
            self.cached = (tf.convert_to_tensor(x), tf.convert_to_tensor(y))
            self.blocks = None  # the budget stays taken: the cache holds the rows
        self._drop_blocks()


def _weighted(ds: tf.data.Dataset, class_weight: dict[int, float] | None) -> tf.data.Dataset:
    """``ds`` with each row weighted by its class (Keras's ``class_weight``) when given."""
    import tensorflow as tf

    if not class_weight:
        return ds
    size = max(2, max(class_weight) + 1)
    table = tf.constant([class_weight.get(c, 1.0) for c in range(size)], dtype=tf.float32)
    return ds.map(lambda x, y: (x, y, tf.gather(table, tf.cast(y, tf.int32))))


def _cache_budget(training: TrainingSpec, local_workers: int) -> _Budget | None:
    """This worker's memory budget for cached shards (None: caching is off)."""
    import psutil

    if not training.cache:
        return None
    free = psutil.virtual_memory().available
    return _Budget(int(free * CACHE_MEMORY_FRACTION / max(1, local_workers)))


def _fit_epochs(
    model: Any,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    epochs: int,
    validation_freq: int,
) -> Any:
    """``model.fit`` over ``train`` for ``epochs`` epochs; several steps per call into
    TensorFlow when the length of every input is known."""
    inputs = [ds for ds in (train, validation) if ds is not None]
    known = all(int(ds.cardinality()) >= 0 for ds in inputs)
    # tf_keras reads the variable at every call (see _compile): 1 while a length is unknown.
    model._steps_per_execution.assign(STEPS_PER_EXECUTION if known else 1)
    return model.fit(
        train,
        validation_data=validation,
        validation_freq=validation_freq,
        epochs=epochs,
        verbose=0,
    )


def _compile(model: Any) -> None:
    """Recompile ``model`` with the user's loss, optimizer and metrics, adding ``auc`` (one
    sigmoid score) and room for several steps per call into TensorFlow."""
    import tf_keras

    config = getattr(getattr(model, "_compile_config", None), "config", None)
    if not config:
        raise TypeError("the model is not compiled: call model.compile(...) in model(idim)")
    metrics = list(config.get("metrics") or [])
    outputs = getattr(model, "outputs", None) or []
    sigmoid = len(outputs) == 1 and outputs[0].shape[-1] == 1
    if sigmoid and not any(getattr(m, "name", m) == "auc" for m in metrics):
        metrics.append(tf_keras.metrics.AUC(name="auc"))
    model.compile(
        **dict(
            config,
            optimizer=model.optimizer,
            metrics=metrics,
            steps_per_execution=STEPS_PER_EXECUTION,
        )
    )
    # Built now, while steps_per_execution > 1: tf_keras then loops over as many steps as
    # the variable says at each call, and _fit_epochs sets it to 1 for unknown lengths
    # (tf_keras refuses several steps per call over an input of unknown length).
    model.make_train_function(force=True)
    model.make_test_function(force=True)


def _agree(strategy, value: float, reduce: str = "mean") -> float:
    """``value`` reduced over all replicas of all workers: their ``mean`` or ``min``.

    A collective: every rank calls it, in the same order.
    """
    import tensorflow as tf

    per_replica = strategy.run(lambda: tf.constant([value], dtype=tf.float64))
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
        # The format is explicit: once tf_keras has loaded a .keras archive in a thread (the
        # safe load of a model file's archive), it saves ".keras" paths as HDF5 there.
        model.save(os.path.join(folder, "model.keras"), save_format="keras_v3")
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
        # A model file's model arrives as its sandbox-built archive, loaded in safe mode.
        model = build_model(
            ModelSpec.model_validate(config["model"]), n_features, archive=config["model_archive"]
        )
        _compile(model)
    start, history = _restore(model)

    batch_size, world = config["batch_size"], ctx.get_world_size()
    budget = _cache_budget(training, ctx.get_local_world_size())

    def feed(name: str) -> _ShardFeed:
        shard = ray.train.get_dataset_shard(name)
        return _ShardFeed(shard, n_features, batch_size, world, budget)

    def seed(epoch: int) -> Seed:
        return (training.seed, rank, epoch) if training.shuffle else None

    validation = feed("validation") if config["has_validation"] else None
    class_weight = {int(k): float(v) for k, v in (training.class_weights or {}).items()} or None
    monitor = "val_loss" if validation is not None else "loss"
    stopper = EarlyStopping(training.early_stopping_patience, training.early_stopping_min_delta)
    for row in history:  # resumed: the same state on every rank (rank 0's checkpoint)
        stopper.update(row.get(monitor, math.inf))

    def finish_step(step: int, row: dict[str, Any], feeds: list[_ShardFeed | None]) -> bool:
        for each in feeds:  # after a first pass: every rank switches to its cache, or none
            if each is not None:
                each.settle(strategy)
        history.append(row)
        # Every rank must take the same decision, or the next collective hangs.
        stop = stopper.update(_agree(strategy, row.get(monitor, math.inf)))
        _report_step(model, rank, step, row, history, stop)
        return stop

    if training.mode == "chunk":
        shard = ray.train.get_dataset_shard("train")
        rows = max(1, config["chunk_size"] // world)
        for step, (x, y, events) in enumerate(_agreed_chunks(strategy, shard, rows, world)):
            if step < start:  # resumed: chunks fitted before the restart are skipped
                continue
            x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
            chunk = _rows(x, y, batch_size, seed(step), world)
            fit = _fit_epochs(
                model,
                _weighted(chunk, class_weight),
                None if validation is None else validation.epoch(),
                epochs=config["epochs"],
                validation_freq=config["epochs"],
            )
            row = {"chunk": step, "events": events, **_last(fit)}
            if finish_step(step, row, [validation]):
                break
        return

    train = feed("train")
    for epoch in range(start, config["epochs"]):
        fit = _fit_epochs(
            model,
            train.epoch(seed(epoch), class_weight),
            None if validation is None else validation.epoch(),
            epochs=1,
            validation_freq=1,
        )
        if finish_step(epoch, {"epoch": epoch, **_last(fit)}, [train, validation]):
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


def _fit(trainer, queue, on_epoch) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``trainer.fit()`` in a thread, relaying per-epoch reports to ``on_epoch`` as
    soon as they arrive."""
    from ray.util.queue import Empty

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
        try:  # wakes up with the next report, or after a while to look at the thread
            ranks = queue.get(timeout=0.5)["ranks"]
        except Empty:
            if done:
                break
            continue
        last = ranks
        if on_epoch is not None and ranks:
            try:
                on_epoch(_step(ranks[0]) + 1, _scalars(ranks[0]))
            except Exception:
                logger.exception("on_epoch callback failed")
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
    :class:`~mlaas4hep.train.model_file.ModelSourceError` for a broken model file,
    :class:`~mlaas4hep.modelfiles.safety.UnsafeModelError` for a model file whose model
    has a refused layer (all before any worker starts; a model file runs only in the
    sandbox, :mod:`mlaas4hep.train.sandbox`) and :class:`TrainingError` when the run fails.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.queue import Queue

    if "train" not in datasets:
        raise ValueError(f"no 'train' dataset among {sorted(datasets)}")
    spec = fitted_to_cluster(spec)
    check_resources(spec.resources)
    # A model file runs once, here, in the sandbox; its archive is loaded once in safe mode
    # so that a broken or unsafe model fails now (naming its file and line, or the refused
    # layer) rather than after the workers have started. Workers get the archive's bytes.
    archive = (
        model_archive(spec.model, int(n_features), seed=spec.training.seed)
        if spec.model.file
        else None
    )
    build_model(spec.model, int(n_features), archive=archive)
    has_validation = "validation" in datasets
    config = {
        "model": spec.model.model_dump(mode="json"),
        "model_archive": archive,
        "training": spec.training.model_dump(mode="json"),
        "n_features": int(n_features),
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "chunk_size": spec.chunk_events,
        "has_validation": has_validation,
        "threads": max(1, int(spec.resources.worker_cpus)),
    }
    monitor = "val_loss" if has_validation else "loss"
    os.environ.setdefault(*CONTROLLER_POLL)  # read by the Train controller when it starts
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
        model = load_checkpoint_model(model_dir / "model.keras")
        y, s = score_dataset(model, datasets["test"])
        if len(y):
            metrics = evaluate(y, s)
        else:
            logger.warning("run %s: the test split is empty; no test metrics", run_id)
    metrics.update(
        history=history,
        epochs_run=len(history),
        kept_epoch=kept["epoch"],
        num_workers=spec.resources.workers,
    )
    return TrainResult(
        model_dir=model_dir,
        history=history,
        metrics=metrics,
        worker_reports=last_reports,
        checkpoint_path=result.path if hasattr(result, "path") else None,
    )


def load_checkpoint_model(path: Path) -> Any:
    """The model of a checkpoint's ``model.keras``, checked and loaded in safe mode."""
    from mlaas4hep.modelfiles.safety import load_keras_model
    from mlaas4hep.settings import load_settings

    return load_keras_model(path, compile=False, allowed=load_settings().allowed_model_layers)


def remove_model_dir(result: TrainResult) -> None:
    """Delete the local model folder of ``result`` once it has been bundled."""
    shutil.rmtree(result.model_dir, ignore_errors=True)
