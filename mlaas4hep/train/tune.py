"""Hyperparameter search: a Ray Tune search whose trials are Ray Train runs.

The spec's ``tune`` block names the parameters to search (fields of the declarative MLP,
or keyword arguments of a model file's ``model(idim, ...)``) and how to sample them.
:func:`search_space` turns it into Ray Tune domains, :func:`trial_spec` applies one
trial's parameters to the spec, and :func:`tune_model` runs the trials (each one a
:func:`~mlaas4hep.train.trainer.train_model` run) and returns the best trial's model.
With a model file, each trial builds its own ``model(idim, **params)`` in the sandbox
(:mod:`mlaas4hep.train.sandbox`, one build per trial's parameters) and its Train workers
get the resulting archive; no trial process executes the model file.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mlaas4hep.spec import MLPSpec, PipelineSpec, SpecError, TuneSpec

if TYPE_CHECKING:
    import ray.data

    from mlaas4hep.train.trainer import TrainResult

#: CPUs a trial's own process asks for; its Ray Train workers ask for theirs.
TRIAL_CPUS = 0.01
#: Samplers a search-space entry may use, with the number of arguments each takes.
SAMPLERS = {"choice": None, "uniform": 2, "loguniform": 2, "randint": 2}


def _domain(name: str, value: Any):
    """The Ray Tune domain of one search-space entry; SpecError naming the entry."""
    from ray import tune

    where = f"tune.search_space.{name}"
    if isinstance(value, list):
        value = {"choice": value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in SAMPLERS:
        raise SpecError(
            f"{where}: give a list of choices or one of "
            + ", ".join(f"{{{k!r}: [...]}}" for k in SAMPLERS)
        )
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}.{kind}: expected a non-empty list")
    if kind == "choice":
        return tune.choice(args)
    if len(args) != SAMPLERS[kind] or not all(isinstance(a, int | float) for a in args):
        raise SpecError(f"{where}.{kind}: expected [low, high], got {args!r}")
    low, high = args
    if not low < high or (kind == "loguniform" and low <= 0):
        raise SpecError(f"{where}.{kind}: need 0 < low < high for loguniform, low < high else")
    return getattr(tune, kind)(low, high)


def search_space(spec: PipelineSpec) -> dict[str, Any]:
    """Ray Tune domains of ``spec.tune.search_space``.

    With the declarative MLP every name must be an MLP field; with a model file every
    name is a keyword argument of ``model(idim, ...)``. Raises SpecError naming the
    entry at fault.
    """
    if spec.tune is None:
        raise SpecError("spec has no tune block")
    if not spec.model.file:
        unknown = sorted(set(spec.tune.search_space) - set(MLPSpec.model_fields))
        if unknown:
            raise SpecError(
                f"tune.search_space: {', '.join(unknown)} not MLP parameters (known: "
                f"{', '.join(MLPSpec.model_fields)}); a model file's model(idim, ...) "
                "takes any keyword arguments"
            )
    return {name: _domain(name, value) for name, value in spec.tune.search_space.items()}


def trial_spec(spec: PipelineSpec, params: dict[str, Any]) -> PipelineSpec:
    """``spec`` with one trial's ``params`` applied to its model, and no tune block."""
    if spec.model.file:
        model = spec.model.model_copy(update={"kwargs": {**spec.model.kwargs, **params}})
    else:
        try:
            mlp = MLPSpec.model_validate({**(spec.model.mlp or MLPSpec()).model_dump(), **params})
        except ValidationError as error:
            raise SpecError(f"tune trial {params}: {error}") from None
        model = spec.model.model_copy(update={"mlp": mlp})
    return spec.model_copy(update={"model": model, "tune": None})


def trial_score(history: list[dict[str, float]], tune_spec: TuneSpec) -> float:
    """A trial's score: the best value of ``tune_spec.metric`` over its epochs."""
    values = [row[tune_spec.metric] for row in history if tune_spec.metric in row]
    if not values:
        known = sorted({k for row in history for k in row})
        raise SpecError(f"tune.metric: {tune_spec.metric!r} not reported (reported: {known})")
    return min(values) if tune_spec.mode == "min" else max(values)


def _trial(config: dict[str, Any], spec_json: str, datasets, n_features, storage_path, run_id):
    """One Tune trial: a Ray Train run of the spec with this trial's parameters."""
    import ray.train
    from ray import tune

    from mlaas4hep.spec import parse_spec
    from mlaas4hep.train.trainer import remove_model_dir, train_model

    spec = parse_spec(json.loads(spec_json))
    trial = trial_spec(spec, config)
    name = f"{run_id}-{tune.get_context().get_trial_id()}"
    result = train_model(trial, datasets, n_features, storage_path, name)
    score = trial_score(result.history, spec.tune)
    try:
        checkpoint = ray.train.Checkpoint.from_directory(str(result.model_dir))
        report = {spec.tune.metric: score, "metrics_json": json.dumps(result.metrics)}
        tune.report(report, checkpoint=checkpoint)
    finally:
        remove_model_dir(result)


def tune_model(
    spec: PipelineSpec,
    datasets: dict[str, ray.data.Dataset],
    n_features: int,
    storage_path: str,
    run_id: str,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Run the spec's Tune search; return the best trial's result and its parameters.

    Each trial trains with ``spec.resources`` under ``storage_path/<run_id>-<trial>``;
    the best trial (by ``spec.tune.metric``) gives the model. ``on_trial(row)`` is
    called with each finished trial's parameters and score. The result's metrics hold
    a ``tune`` entry listing every trial.
    """
    from ray import tune

    from mlaas4hep.train.trainer import (
        TrainingError,
        TrainResult,
        check_resources,
        fitted_to_cluster,
    )

    assert spec.tune is not None
    spec = fitted_to_cluster(spec)
    check_resources(spec.resources)
    space = search_space(spec)
    trainable = tune.with_parameters(
        _trial,
        spec_json=spec.to_json(),
        datasets=datasets,
        n_features=int(n_features),
        storage_path=storage_path,
        run_id=run_id,
    )
    tuner = tune.Tuner(
        # The trial only drives its Train run and scores the test split: a token CPU share
        # (Tune refuses a trial that asks for nothing).
        tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.tune.metric,
            mode=spec.tune.mode,
            num_samples=spec.tune.num_samples,
            max_concurrent_trials=spec.tune.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=f"{run_id}-tune", storage_path=storage_path),
    )
    grid = tuner.fit()
    trials = []
    for trial in grid:
        row = {"params": trial.config, "error": str(trial.error) if trial.error else None}
        row["score"] = (trial.metrics or {}).get(spec.tune.metric)
        trials.append(row)
        if on_trial is not None:
            on_trial(row)
    scored = [
        t for t in trials if isinstance(t["score"], int | float) and math.isfinite(t["score"])
    ]
    if not scored:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported"
        raise TrainingError(f"run {run_id}: every tune trial failed: {errors}")
    best = grid.get_best_result(metric=spec.tune.metric, mode=spec.tune.mode)
    model_dir = Path(tempfile.mkdtemp(prefix=f"mlaas4hep-model-{run_id}-"))
    best.checkpoint.to_directory(str(model_dir))
    metrics = json.loads(best.metrics["metrics_json"])
    metrics["tune"] = {
        "metric": spec.tune.metric,
        "mode": spec.tune.mode,
        "best_params": best.config,
        "trials": trials,
    }
    result = TrainResult(model_dir=model_dir, history=metrics["history"], metrics=metrics)
    return result, dict(best.config)
