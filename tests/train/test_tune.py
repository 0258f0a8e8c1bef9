"""The spec's ``tune`` block: search-space parsing, trial specs and trial scores.

Most tests run no trials (each trial is a Ray Train run): they check everything a search
is built from. One runs a real two-trial search through the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlaas4hep.spec import SpecError, parse_spec
from mlaas4hep.train.tune import search_space, trial_score, trial_spec

MODEL_FILE = """\
from tensorflow import keras

def model(idim, units=8, rate=1e-3):
    model = keras.Sequential([
        keras.layers.Dense(units, activation='relu', input_shape=(idim,)),
        keras.layers.Dense(1, activation='sigmoid'),
    ])
    model.compile(loss='binary_crossentropy', optimizer=keras.optimizers.Adam(rate))
    return model
"""


def spec_with(search: dict, model=None, **tune):
    data = {
        "name": "tuned",
        "files": [{"path": "signal.root", "label": 1}],
        "tune": {"search_space": search, **tune},
    }
    if model is not None:
        data["model"] = model
    return parse_spec(data)


def test_mlp_search_space_becomes_ray_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    spec = spec_with(
        {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "layers": [[16], [32, 16]]},
        num_samples=3,
        metric="val_auc",
        mode="max",
    )
    space = search_space(spec)
    assert isinstance(space["learning_rate"], Float)
    assert isinstance(space["layers"], Categorical)
    assert 1e-4 <= space["learning_rate"].sample() <= 1e-2
    assert space["layers"].sample() in ([16], [32, 16])
    assert (spec.tune.num_samples, spec.tune.metric, spec.tune.mode) == (3, "val_auc", "max")


def test_unknown_mlp_parameter_is_refused_naming_it():
    with pytest.raises(SpecError, match=r"tune.search_space: units not MLP parameters"):
        search_space(spec_with({"units": [8, 16]}))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"normal": [0, 1]}, r"tune.search_space.dropout: give a list of choices or one of"),
        ({"uniform": [0.5]}, r"tune.search_space.dropout.uniform: expected \[low, high\]"),
        ({"uniform": [0.5, 0.1]}, r"dropout.uniform: need 0 < low < high"),
        ({"loguniform": [0, 0.1]}, r"dropout.loguniform: need 0 < low < high"),
        ({"choice": []}, r"tune.search_space.dropout.choice: expected a non-empty list"),
    ],
)
def test_bad_search_space_entry_is_refused_naming_it(entry, message):
    with pytest.raises(SpecError, match=message):
        search_space(spec_with({"dropout": entry}))


def test_tune_block_fields_are_validated_by_the_spec():
    with pytest.raises(SpecError, match=r"tune.num_samples"):
        spec_with({"dropout": [0.1]}, num_samples=0)
    with pytest.raises(SpecError, match=r"tune.search_space"):
        spec_with({})
    with pytest.raises(SpecError, match=r"'kwargs' are arguments of a model file"):
        parse_spec({"files": ["a.root"], "label_branch": "y", "model": {"kwargs": {"a": 1}}})


def test_trial_spec_applies_parameters_to_the_mlp_and_drops_the_tune_block():
    spec = spec_with({"dropout": [0.1, 0.2]}, model={"mlp": {"layers": [8]}})
    trial = trial_spec(spec, {"dropout": 0.2, "learning_rate": 0.01})
    assert trial.tune is None
    assert trial.model.mlp.layers == [8]
    assert (trial.model.mlp.dropout, trial.model.mlp.learning_rate) == (0.2, 0.01)
    assert spec.model.mlp.dropout == 0.0  # the search's own spec is left alone
    with pytest.raises(SpecError, match=r"tune trial \{'dropout': 1.5\}"):
        trial_spec(spec, {"dropout": 1.5})


def test_trial_spec_passes_parameters_to_the_model_file(tmp_path):
    from mlaas4hep.train.models import build_model

    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    spec = spec_with({"units": [4, 12], "rate": {"loguniform": [1e-4, 1e-2]}}, model=str(path))
    assert set(search_space(spec)) == {"units", "rate"}
    trial = trial_spec(spec, {"units": 12, "rate": 0.005})
    assert trial.model.kwargs == {"units": 12, "rate": 0.005}
    model = build_model(trial.model, 5)
    assert model.layers[0].units == 12
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)


def test_trial_score_is_the_best_epoch_of_the_metric():
    history = [{"epoch": 0, "val_loss": 0.6, "val_auc": 0.7}, {"epoch": 1, "val_loss": 0.5}]
    minimize = spec_with({"dropout": [0.1]}).tune
    assert trial_score(history, minimize) == 0.5
    maximize = spec_with({"dropout": [0.1]}, metric="val_auc", mode="max").tune
    assert trial_score(history, maximize) == 0.7
    missing = spec_with({"dropout": [0.1]}, metric="val_f1").tune
    with pytest.raises(SpecError, match=r"tune.metric: 'val_f1' not reported"):
        trial_score(history, missing)


@pytest.mark.ray
def test_tune_search_runs_trials_and_registers_the_best_trials_model(ray_cluster, tmp_path):
    # A real search: two one-epoch trials of the declarative MLP on small demo data, run
    # by the pipeline itself, which registers the best trial's model.
    from mlaas4hep.cli.demo import write_demo_data
    from mlaas4hep.pipeline.orchestrator import run_pipeline
    from mlaas4hep.store.registry import ModelRegistry
    from mlaas4hep.store.runs import new_run_id
    from mlaas4hep.store.storage import Storage

    signal, background = write_demo_data(tmp_path / "data", events=400, seed=5)
    spec = parse_spec(
        {
            "name": "tuned",
            "files": [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}],
            "identifier": ["run", "event", "luminosityBlock"],
            "epochs": 1,
            "batch_size": 64,
            "model": {"mlp": {"layers": [8]}},
            "resources": {"num_workers": 1},
            "tune": {
                "search_space": {"learning_rate": [0.05, 0.0001]},
                "num_samples": 2,
                "max_concurrent_trials": 2,
            },
        }
    )
    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    record = run_pipeline(spec, run_id, "alice", storage)

    assert record["state"] == "SUCCEEDED", record.get("message")
    metrics = storage.read_json("runs", run_id, "metrics.json")
    trials = metrics["tune"]["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    best = min(trials, key=lambda t: t["score"])
    assert metrics["tune"]["best_params"] == best["params"]
    assert min(row["val_loss"] for row in metrics["history"]) == pytest.approx(best["score"])
    version = ModelRegistry(storage).get("tuned")
    assert record["model"] == {"name": "tuned", "version": version.version}
    assert version.metadata["metrics"]["tune"]["best_params"] == best["params"]
    assert (Path(version.path) / "model.keras").is_file()
