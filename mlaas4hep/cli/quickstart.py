"""The demo pipeline, end to end over HTTP (what ``make run`` shows a new user).

Writes demo ROOT files, submits a pipeline with a token, follows it, then asks the
served model for a prediction on one event read from the data.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from mlaas4hep.cli.client import PlatformClient

#: A model file as MLaaS4HEP users write them (Keras 2-era code).
DEMO_MODEL = textwrap.dedent(
    '''\
    """Demo classifier: model(idim) returns a compiled Keras model (MLaaS4HEP convention)."""
    from tensorflow import keras


    def model(idim):
        model = keras.Sequential([
            keras.layers.Dense(64, activation="relu", input_shape=(idim,)),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
        return model
    '''
)


def write_demo_inputs(folder: Path, events: int = 4000, seed: int = 42, epochs: int = 5) -> Path:
    """Write demo ROOT files, ``model.py`` and ``spec.yaml`` into ``folder``; return the spec."""
    from mlaas4hep.cli.demo import write_demo_data

    folder.mkdir(parents=True, exist_ok=True)
    signal, background = write_demo_data(folder, events=events, seed=seed)
    (folder / "model.py").write_text(DEMO_MODEL)
    spec: dict[str, Any] = {
        "name": "demo",
        "files": [
            {"path": signal.name, "label": 1},
            {"path": background.name, "label": 0},
        ],
        "branch": "Events",
        "identifier": ["run", "event", "luminosityBlock"],
        "nevts": -1,
        "chunk_size": 2000,
        "epochs": epochs,
        "batch_size": 128,
        "model": "model.py",
        "resources": {"num_workers": 2},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def print_progress(record: dict) -> None:
    progress = record.get("progress") or {}
    line = f"  [{record['state']:<9}] {record.get('stage', '')}"
    if progress.get("epoch"):
        metrics = ", ".join(
            f"{k}={v:.4f}"
            for k, v in progress.items()
            if k not in {"epoch", "epochs"} and isinstance(v, float)
        )
        line += f"  epoch {progress['epoch']}/{progress.get('epochs', '?')}  {metrics}"
    print(line, flush=True)


def predict_event(
    client: PlatformClient, run_id: str, model: str, root_file: Path, entry: int
) -> tuple[list, list[str]]:
    """Flatten event ``entry`` of ``root_file`` with the run's specs and ask ``model`` for it."""
    import json

    import uproot

    from mlaas4hep.data.features import FeatureSpecs
    from mlaas4hep.data.flatten import flatten_events

    specs = FeatureSpecs.from_dict(json.loads(client.artifact(run_id, "specs.json")))
    branches = list(specs.fkeys) + list(specs.jkeys)
    with uproot.open(root_file) as f:
        arrays = f["Events"].arrays(branches, entry_start=entry, entry_stop=entry + 1, library="ak")
    event = {
        name: arrays[name][0].tolist() if hasattr(arrays[name][0], "tolist") else arrays[name][0]
        for name in branches
    }
    features = flatten_events([event], specs)
    values = [None if v != v else float(v) for v in features[0]]
    return client.predict(model, values, keys=specs.feature_names()), specs.feature_names()
