"""Batch inference over ROOT files: score whole datasets with a model bundle.

The events are read with the data layer (:func:`~mlaas4hep.data.datasource.read_events`,
one read task per file cluster range), then scored by a pool of Ray Data actors
(:class:`BundleScorer`) that each load the bundle once and flatten every block with the
bundle's ``specs.json`` exactly as the training data was. The output is Parquet with the
identifier branches, the file each event came from, and one score column per model
output (``score`` for a single output, ``score_<label>`` otherwise)::

    mlaas4hep predict-files higgs data/*.root --out scores/ --identifier run,event
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlaas4hep.bundle import BundleError, check_bundle_dir, check_bundle_model, read_tree
from mlaas4hep.data.features import FeatureSpecs
from mlaas4hep.data.rootio import FILE_INDEX_COLUMN
from mlaas4hep.spec import PipelineSpec
from mlaas4hep.store.storage import Storage

FILE_COLUMN = "file"


@dataclass(frozen=True)
class BundleSource:
    """A bundle shipped to the scoring actors: its files, name and version."""

    files: dict[str, bytes]
    name: str
    version: int

    @property
    def specs(self) -> FeatureSpecs:
        """The bundle's feature specs; :class:`BundleError` when it has none."""
        raw = self.files.get("specs.json")
        if raw is None:
            raise BundleError(
                f"model {self.name!r} has no specs.json: batch scoring needs the feature specs"
            )
        try:
            return FeatureSpecs.from_dict(json.loads(raw))
        except (ValueError, TypeError, AttributeError) as error:
            raise BundleError(f"model {self.name!r}: specs.json: {error}") from None


@dataclass(frozen=True)
class PredictionResult:
    """What :func:`predict_files` wrote."""

    out_dir: str
    events: int
    columns: list[str]


def find_bundle(model: str, storage: Storage | None = None) -> BundleSource:
    """The bundle of ``model``: a bundle folder, or a registered ``name`` / ``name/versions/N``.

    Raises :class:`BundleError` for a folder that is not a bundle or whose model file is
    unsafe (checked here, before any scoring actor loads it) and the registry's
    ``ModelNotFound`` for an unknown model or version.
    """
    folder = Path(model)
    if folder.is_dir():
        params = check_bundle_dir(folder)
        check_bundle_model(folder, params)
        return BundleSource(read_tree(folder), params["name"], 0)
    from mlaas4hep.serve.dataplane import DataPlane
    from mlaas4hep.store.registry import ModelRegistry

    if storage is None:
        raise BundleError(f"model {model!r} is not a bundle folder and no storage is given")
    name, version = DataPlane.parse_ref(model)
    registry = ModelRegistry(storage)
    entry = registry.get(name, version)
    with storage.local_copy("models", name, str(entry.version)) as path:
        check_bundle_model(Path(path), check_bundle_dir(Path(path), name, match=False))
        return BundleSource(read_tree(Path(path)), name, entry.version)


def score_columns(labels: Sequence[str], n_outputs: int) -> list[str]:
    """Names of the score columns: ``score``, or ``score_<label>`` per output."""
    if n_outputs == 1:
        return ["score"]
    if len(labels) == n_outputs:
        return [f"score_{label}" for label in labels]
    return [f"score_{i}" for i in range(n_outputs)]


class BundleScorer:
    """Ray Data actor: loads the bundle once, then scores Arrow blocks of events."""

    def __init__(
        self, source: BundleSource, files: Sequence[str], identifiers: Sequence[str]
    ) -> None:
        from mlaas4hep.bundle import load_bundle, write_tree

        # Loaded into memory, then the files go: Ray ends actors without running finalizers.
        with tempfile.TemporaryDirectory(prefix="mlaas4hep-score-") as tmp:
            folder = write_tree(source.files, Path(tmp))
            self.model = load_bundle(folder, source.name, source.version)
        self.specs = source.specs
        self.files = np.asarray(list(files), dtype=object)
        self.identifiers = list(identifiers)
        self.columns = score_columns(self.model.labels, self.model.n_outputs)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from mlaas4hep.data.flatten import flatten_columns, to_model_input

        columns = {name: batch.column(name) for name in batch.column_names}
        features, _ = flatten_columns(columns, self.specs, math.nan)
        scores = self.model.predict(to_model_input(features))
        out = {name: batch.column(name).to_numpy() for name in self.identifiers}
        out[FILE_COLUMN] = self.files[batch.column(FILE_INDEX_COLUMN).to_numpy()].astype(str)
        for j, name in enumerate(self.columns):
            out[name] = scores[:, j]
        return out


def scoring_spec(
    specs: FeatureSpecs,
    files: Sequence[str],
    tree: str = "Events",
    identifiers: Sequence[str] = (),
    chunk_size: int = 10_000,
) -> PipelineSpec:
    """The data layer's spec reading the branches ``specs`` needs (and ``identifiers``)."""
    return PipelineSpec(
        files=[{"path": path, "label": 0} for path in files],
        branch=tree,
        identifier=list(identifiers),
        selected_branches=[*specs.fkeys, *specs.jkeys],
        chunk_size=chunk_size,
    )


def predict_files(
    model: str | BundleSource,
    files: Sequence[str],
    out_dir: str,
    *,
    storage: Storage | None = None,
    tree: str = "Events",
    identifiers: Sequence[str] = (),
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    chunk_size: int = 10_000,
) -> PredictionResult:
    """Score every event of ``files`` (TTree ``tree``) with ``model``; write Parquet to
    ``out_dir`` (local path or fsspec URL). Needs a Ray session.

    ``model`` is a bundle folder, a registered model reference (with ``storage``) or a
    :class:`BundleSource`. Raises :class:`BundleError` for a bundle without specs.json and
    ``DataError`` naming the file or branch the specs need but the files lack.
    """
    import pyarrow.parquet as pq

    from mlaas4hep.data.datasource import read_events

    if not files:
        raise ValueError("predict_files needs at least one ROOT file")
    source = model if isinstance(model, BundleSource) else find_bundle(model, storage)
    spec = scoring_spec(source.specs, files, tree, identifiers, chunk_size)
    scored = read_events(spec, pipeline=f"predict-{source.name}").map_batches(
        BundleScorer,
        fn_constructor_kwargs={
            "source": source,
            "files": [f.path for f in spec.files],
            "identifiers": list(identifiers),
        },
        batch_format="pyarrow",
        batch_size=None,
        concurrency=actors,
        num_cpus=cpus_per_actor,
    )
    scored.write_parquet(out_dir)
    written = pq.ParquetDataset(out_dir)
    return PredictionResult(
        out_dir=out_dir,
        events=sum(f.metadata.num_rows for f in written.fragments),
        columns=list(written.schema.names),
    )


def run_request(request_uri: str) -> PredictionResult:
    """Run the batch prediction recorded at ``request_uri`` (the Ray Job's entrypoint):
    score its files and write ``result.json`` beside the request."""
    import fsspec
    import ray

    with fsspec.open(request_uri, "r") as stream:
        request = json.load(stream)
    storage = Storage(request["storage"])
    ray.init(log_to_driver=True)
    try:
        result = predict_files(
            request["model"],
            request["files"],
            request["out"],
            storage=storage,
            tree=request["tree"],
            identifiers=request["identifier"],
            actors=request["actors"],
        )
    finally:
        ray.shutdown()
    summary = {"events": result.events, "columns": result.columns}
    storage.write_json(summary, "predictions", request["id"], "result.json")
    return result


if __name__ == "__main__":
    import sys

    print(run_request(sys.argv[1]))
