"""Training throughput: the platform (Ray Train, 1 and 2 workers) against plain Keras.

Every configuration trains the same declarative MLP on the flattened features of the
demo data (``mlaas4hep.cli.demo.write_demo_data``), with the same global batch and
epochs, in one run on this machine:

* ``keras``: plain ``tf_keras`` ``model.fit`` in this process on the features held in
  memory as numpy arrays (the baseline);
* ``platform Nw streaming``: ``train_model`` with N workers, each streaming its shard
  from the lazy Ray Data pipeline (ROOT read + flatten); as in a pipeline, each worker
  keeps its flattened shard in memory after the first epoch when it fits
  (``training.cache``, the default);
* ``platform Nw in-memory``: the same with the flattened dataset materialized in the
  object store first;
* ``platform Nw streaming, no cache``: ``training.cache: false``, the path of data larger
  than memory: ROOT read + flatten re-executed every epoch (``--uncached`` worker counts).

Reported per configuration: steady-state samples/s (epochs 2..E: events x (E-1) over the
time between the end of epoch 1 and the end of epoch E, so the one-off start is left
out) and time to first step (from the call to the end of the first step; for the
platform, the first epoch report minus one steady epoch, so it includes starting the
workers and TensorFlow). The platform's epochs include its per-epoch checkpoint.

    python benchmarks/train_throughput.py [--events 200000] [--epochs 5]

Prints a table and writes ``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def build_spec(
    folder: Path, events: int, epochs: int, batch_size: int, workers: int, cache: bool = True
):
    """The pipeline spec of the benchmark's demo data (no validation or test split)."""
    from mlaas4hep.spec import parse_spec

    return parse_spec(
        {
            "name": "bench",
            "files": [
                {"path": str(folder / "signal.root"), "label": 1},
                {"path": str(folder / "background.root"), "label": 0},
            ],
            "identifier": ["run", "event", "luminosityBlock"],
            "chunk_size": max(10_000, events // 4),
            "epochs": epochs,
            "batch_size": batch_size,
            "model": {"mlp": {"layers": [64, 32]}},
            "training": {
                "validation_fraction": 0.0,
                "test_fraction": 0.0,
                "shuffle": False,
                "cache": cache,
            },
            "resources": {"num_workers": workers},
        }
    )


def flat_dataset(spec):
    """The lazy (streaming) flattened Ray Dataset of ``spec`` and its number of features."""
    from mlaas4hep.data.datasource import read_events
    from mlaas4hep.data.features import compute_specs
    from mlaas4hep.data.flatten import flatten_dataset
    from mlaas4hep.data.rootio import inspect_inputs

    events = read_events(spec, inspect_inputs(spec))
    specs = compute_specs(events, spec)
    return flatten_dataset(events, specs, spec), specs.n_features


def steady(times: list[float], rows: int) -> tuple[float, float]:
    """(samples/s over epochs 2..E, one steady epoch's seconds) from epoch end times."""
    span = times[-1] - times[0]
    per_epoch = span / (len(times) - 1)
    return rows * (len(times) - 1) / span, per_epoch


def run_keras(x: np.ndarray, y: np.ndarray, spec) -> dict[str, Any]:
    """Plain Keras fit in this process on in-memory arrays."""
    import tf_keras

    from mlaas4hep.train.models import build_model

    marks: dict[str, Any] = {"epochs": []}

    class Clock(tf_keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.setdefault("first_step", time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            marks["epochs"].append(time.perf_counter())

    tf_keras.utils.set_random_seed(spec.training.seed)
    model = build_model(spec.model, x.shape[1])
    start = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=spec.batch_size,
        epochs=spec.epochs,
        shuffle=False,
        verbose=0,
        callbacks=[Clock()],
    )
    rate, _ = steady(marks["epochs"], len(x))
    return {"samples_per_s": rate, "first_step_s": marks["first_step"] - start}


def run_platform(ds, n_features: int, rows: int, spec, storage: Path, name: str) -> dict:
    """``train_model`` on ``ds``; times from the driver's per-epoch reports."""
    from mlaas4hep.train.trainer import remove_model_dir, train_model

    ends: list[float] = []
    start = time.perf_counter()
    result = train_model(
        spec,
        {"train": ds},
        n_features,
        str(storage),
        name,
        on_epoch=lambda epoch, metrics: ends.append(time.perf_counter()),
    )
    remove_model_dir(result)
    rate, epoch_s = steady(ends, rows)
    return {"samples_per_s": rate, "first_step_s": ends[0] - start - epoch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per demo file")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument(
        "--uncached", default="1", help="worker counts to measure streaming without cache too"
    )
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args()

    import ray

    from mlaas4hep.cli.demo import write_demo_data
    from mlaas4hep.train.trainer import to_model_input

    work = Path(tempfile.mkdtemp(prefix="mlaas4hep-bench-train-"))
    rows_out: list[dict[str, Any]] = []
    try:
        write_demo_data(work, events=args.events, seed=1)
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(work / "ray"),  # a head of its own, beside any other on this machine
        )
        base = build_spec(work, args.events, args.epochs, args.batch_size, 1)
        streaming, n_features = flat_dataset(base)
        in_memory = streaming.materialize()
        batches = list(in_memory.iter_batches(batch_size=65_536, batch_format="numpy"))
        x = np.concatenate([to_model_input(b["features"]) for b in batches])
        y = np.concatenate([np.asarray(b["label"], np.float32) for b in batches])
        rows = len(x)
        print(
            f"{rows} events x {n_features} features, {args.epochs} epochs, batch {args.batch_size}"
        )

        keras = run_keras(x, y, base)
        rows_out.append({"config": "keras in-memory (1 process)", **keras})
        uncached = {int(w) for w in args.uncached.split(",") if w}
        for workers in (int(w) for w in args.workers.split(",")):
            runs = [("streaming", streaming, True), ("in-memory", in_memory, True)]
            if workers in uncached:
                runs.append(("streaming, no cache", streaming, False))
            for mode, ds, cache in runs:
                spec = build_spec(work, args.events, args.epochs, args.batch_size, workers, cache)
                name = f"bench-{workers}w-{mode.replace(', ', '-').replace(' ', '-')}"
                result = run_platform(ds, n_features, rows, spec, work / "ckpt", name)
                rows_out.append({"config": f"platform {workers}w {mode}", **result})
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    keras_rate = rows_out[0]["samples_per_s"]
    by_config = {r["config"]: r for r in rows_out}
    for row in rows_out:
        row["vs_keras"] = row["samples_per_s"] / keras_rate
        if "streaming" in row["config"]:
            memory = by_config[row["config"].split(" streaming")[0] + " in-memory"]
            row["streaming_vs_in_memory"] = row["samples_per_s"] / memory["samples_per_s"]

    print(
        f"\n{'configuration':<36} {'samples/s':>11} {'x keras':>8} {'first step s':>13} "
        f"{'stream/mem':>11}"
    )
    for row in rows_out:
        ratio = row.get("streaming_vs_in_memory")
        print(
            f"{row['config']:<36} {row['samples_per_s']:>11,.0f} {row['vs_keras']:>8.2f} "
            f"{row['first_step_s']:>13.1f} {'' if ratio is None else f'{ratio:.2f}':>11}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "train_throughput.json"
    out.write_text(
        json.dumps(
            {
                "events": rows,
                "n_features": n_features,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(),
                "python": platform.python_version(),
                "results": rows_out,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
