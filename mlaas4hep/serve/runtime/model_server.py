"""The model deployment: loads bundles lazily by id, batches rows, predicts.

Requests carry a multiplexed model id ``"<name>@<version>#<stamp>"`` resolved by the
ingress from storage (:mod:`mlaas4hep.serve.runtime.model_cache`); ``stamp`` changes when a
version folder is replaced, so a replica never answers with a model that storage no
longer holds.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from mlaas4hep.bundle import BundleError, LoadedModel, import_keras, load_bundle, write_tree
from mlaas4hep.serve.runtime.model_cache import (
    MAX_MODELS_PER_REPLICA,
    load_registered,
    parse_model_id,
)
from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.storage import Storage

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


class ModelMetrics:
    """Requests, errors, latency and rows per model call, per model, in Ray's metrics."""

    def __init__(self) -> None:
        tags = ("model", "version")
        self.requests = metrics.Counter(
            "mlaas4hep_model_requests", "Prediction requests per model", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "mlaas4hep_model_errors", "Prediction requests refused or failed", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "mlaas4hep_model_latency_ms",
            "Time to answer a prediction request in the replica",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=tags,
        )
        self.batch_rows = metrics.Histogram(
            "mlaas4hep_model_batch_rows",
            "Rows per model call after dynamic batching",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=tags,
        )

    @contextmanager
    def request(self, name: str, version: int) -> Iterator[None]:
        """Count and time one prediction request of ``name`` (an error if it raises)."""
        start = time.perf_counter()
        tags = {"model": name, "version": str(version)}
        self.requests.inc(tags=tags)
        try:
            yield
        except Exception:
            self.errors.inc(tags=tags)
            raise
        finally:
            self.latency.observe((time.perf_counter() - start) * 1e3, tags=tags)

    def model_call(self, model: LoadedModel, rows: int) -> None:
        """Record a call of ``model`` on ``rows`` rows."""
        self.batch_rows.observe(rows, tags={"model": model.name, "version": str(model.version)})


class ModelServer:
    """Serve deployment body: ``predict`` and ``describe`` for the request's model id."""

    def __init__(self, storage_root: str) -> None:
        import_keras()  # before Serve freezes the startup objects out of GC scans
        self.registry = ModelRegistry(Storage(storage_root))
        self.metrics = ModelMetrics()

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedModel:
        name, version = parse_model_id(model_id)
        return await asyncio.to_thread(load_registered, self.registry, name, version)

    async def describe(self) -> dict[str, Any]:
        """Shapes, labels and params of the request's model."""
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.describe()

    async def predict(self, matrix: np.ndarray, keys: list[str] | None = None) -> np.ndarray:
        """Outputs ``[n_rows, n_outputs]``; :class:`InputError` when ``matrix`` does not fit."""
        return await self._measured(lambda model: model.reorder(matrix, keys))

    async def predict_events(self, events: Any) -> np.ndarray:
        """Outputs for raw physics events, flattened with the bundle's specs.json."""
        return await self._measured(lambda model: model.events_matrix(events))

    async def predict_image(self, data: bytes) -> np.ndarray:
        """Outputs for one image file, decoded and resized to the model's input shape."""
        return await self._measured(lambda model: model.image_matrix(data))

    async def _measured(self, inputs: Any) -> np.ndarray:
        """Predict on ``inputs(model)`` for the request's model, counting and timing it."""
        model_id = serve.get_multiplexed_model_id()
        with self.metrics.request(*parse_model_id(model_id)):
            model = await self.get_model(model_id)
            return await self._predict_batch(inputs(model))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _predict_batch(self, matrices: list[np.ndarray]) -> list[np.ndarray]:
        # Serve splits batches by multiplexed model id: one model per batch.
        model = await self.get_model(serve.get_multiplexed_model_id())
        self.metrics.model_call(model, sum(len(m) for m in matrices))
        if len(matrices) == 1:
            return [model.predict(matrices[0])]
        out = model.predict(np.concatenate(matrices))
        bounds = np.cumsum([len(m) for m in matrices])[:-1]
        return np.split(out, bounds)

    async def check_bundle(self, files: dict[str, bytes], name: str) -> dict[str, Any]:
        """Load an uploaded bundle from its files; its description, or :class:`BundleError`."""
        return await asyncio.to_thread(self._check_bundle, files, name)

    @staticmethod
    def _check_bundle(files: dict[str, bytes], name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="mlaas4hep-check-") as tmp:
            model = load_bundle(write_tree(files, Path(tmp)), name, 0)
            if model.labels and model.n_outputs not in (1, len(model.labels)):
                raise BundleError(
                    f"labels file has {len(model.labels)} labels "
                    f"but the model has {model.n_outputs} outputs"
                )
            return model.describe()
