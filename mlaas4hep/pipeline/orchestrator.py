"""The pipeline itself: the body of each pipeline's Ray Job (``mlaas4hep run``).

read ROOT files (Ray Data) → specs pass → flatten → train (Ray Train) → bundle → registry.
Every stage is recorded in the run's ``status.json`` and log, so the API, the CLI and a
restarted replica all see the same progress; a failure records its message and re-raises
so the Ray Job fails too.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

from mlaas4hep.auth.redact import RedactingFilter, Redactor
from mlaas4hep.pipeline.rayjob import STAGED_BUNDLE, STAGED_STAGE
from mlaas4hep.settings import load_settings
from mlaas4hep.spec import PipelineSpec
from mlaas4hep.store.quota import check_run_outputs
from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunState, RunStore, now_iso
from mlaas4hep.store.storage import Storage

logger = logging.getLogger("mlaas4hep.pipeline")


class RunLogHandler(logging.Handler):
    """Append log records to ``runs/<run_id>/log`` in storage."""

    def __init__(self, storage: Storage, run_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.storage = storage
        self.run_id = run_id
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.storage.append_text(self.format(record) + "\n", "runs", self.run_id, "log")
        except OSError:
            self.handleError(record)


def _attach_log(storage: Storage, run_id: str, redactor: Redactor) -> RunLogHandler:
    """Send the pipeline's log records to the run's log (and stderr), secrets redacted."""
    handler = RunLogHandler(storage, run_id)
    handler.addFilter(RedactingFilter(redactor))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        stream.addFilter(RedactingFilter(redactor))
        logger.addHandler(stream)
    return handler


def run_pipeline(spec: PipelineSpec, run_id: str, owner: str, storage: Storage) -> dict[str, Any]:
    """Run one pipeline to the end and return its final run record.

    Creates the run record when it does not exist yet (a pipeline started with
    ``ray job submit -- mlaas4hep run SPEC`` rather than through the API). The Ray token
    and the issuer's private key are redacted from its log and status message.
    """
    runs = RunStore(storage)
    try:
        runs.get(run_id)
    except LookupError:
        runs.create(run_id, owner=owner, name=spec.name, source="cli")
        storage.write_text(spec.to_json(), "runs", run_id, "spec.json")
    settings = load_settings()
    redactor = Redactor.from_settings(settings)
    handler = _attach_log(storage, run_id, redactor)
    try:
        return _run_stages(
            spec, run_id, owner, storage, runs, stage_bundle=settings.job_backend == "rayjob"
        )
    except BaseException as error:
        if runs.get(run_id)["state"] == RunState.CANCELLED:
            logger.info("pipeline cancelled")  # the job was stopped: keep CANCELLED
            raise
        message = redactor.redact(f"{type(error).__name__}: {error}")
        where = "" if _says_why(error) else "\n" + redactor.redact(traceback.format_exc())
        logger.error("pipeline failed: %s%s", message, where)
        runs.update(run_id, state=RunState.FAILED, message=message, finished=now_iso())
        raise
    finally:
        logger.removeHandler(handler)


def _says_why(error: BaseException) -> bool:
    """True for the failures whose message says all (bad input, resources, a failed
    training or model file): logged without the driver's traceback, which adds nothing."""
    from mlaas4hep.train.sandbox import SandboxError
    from mlaas4hep.train.trainer import ResourceError, TrainingError

    known = ValueError | LookupError | ResourceError | TrainingError | SandboxError
    return isinstance(error, known)


def _run_stages(
    spec: PipelineSpec,
    run_id: str,
    owner: str,
    storage: Storage,
    runs: RunStore,
    *,
    stage_bundle: bool,
) -> dict[str, Any]:
    # Imported here: TensorFlow must only load after TF_USE_LEGACY_KERAS is set.
    from mlaas4hep.bundle import write_bundle
    from mlaas4hep.data.datasets import obtain_specs
    from mlaas4hep.data.datasource import read_events_once, shuffle_events
    from mlaas4hep.data.flatten import flatten_dataset
    from mlaas4hep.data.rootio import inspect_inputs
    from mlaas4hep.train.metrics import save_plots
    from mlaas4hep.train.trainer import (
        check_resources,
        epoch_metrics,
        fitted_to_cluster,
        remove_model_dir,
        split_dataset,
        train_model,
    )

    record = runs.update(
        run_id, state=RunState.RUNNING, stage="checking inputs", message="", started=now_iso()
    )
    logger.info("run %s: model %r for %s", run_id, spec.name, owner)
    if record.get("resumes"):
        # train_model picks up the checkpoints kept under the same run id.
        logger.info(
            "resume %d: training continues from the run's latest checkpoint", record["resumes"]
        )
    unused = spec.unused_keys_message()
    if unused:
        logger.warning("%s", unused)
    spec = fitted_to_cluster(spec, logger)  # unset workers/CPUs: what fits, said in the log
    check_resources(spec.resources)
    summary = inspect_inputs(spec)
    logger.info("inputs: %s", summary)

    runs.update(run_id, stage="specs pass")
    events = read_events_once(spec, summary, pipeline=run_id)
    # A resumed run reuses its own specs, else the spec's `specs` file, when still valid.
    stored = storage.uri("runs", run_id, "specs.json")
    reuse = stored if storage.exists("runs", run_id, "specs.json") else spec.specs
    obtained = obtain_specs(spec, summary, reuse, events)
    specs = obtained.specs
    storage.write_json(obtained.document, "runs", run_id, "specs.json")
    if reuse:
        logger.info("specs %s: %s", "reused" if obtained.reused else "recomputed", obtained.why)
    logger.info("%s", obtained.describe())

    chunked = spec.training.mode == "chunk"
    start = {"chunk": 0} if chunked else {"epoch": 0}
    runs.update(run_id, stage="training", progress={**start, "epochs": spec.epochs})
    flat = shuffle_events(flatten_dataset(events, specs, spec), spec)
    splits = split_dataset(flat, spec.training)

    def on_epoch(step: int, metrics: dict[str, Any]) -> None:
        # Train and validation loss/accuracy/AUC: loss, accuracy, auc, val_loss, ...
        metrics = epoch_metrics(metrics)
        where = f"chunk {step}" if chunked else f"epoch {step}/{spec.epochs}"
        logger.info("%s: %s", where, metrics)
        position = {"chunk": step} if chunked else {"epoch": step}
        runs.update(run_id, progress={**position, "epochs": spec.epochs, **metrics})

    checkpoints = storage.uri("runs", run_id, "train")
    if spec.tune is not None:
        from mlaas4hep.train.tune import tune_model

        def on_trial(trial: dict[str, Any]) -> None:
            logger.info("tune trial %s: %s = %s", trial["params"], spec.tune.metric, trial["score"])

        runs.update(run_id, stage="tuning")
        result, best = tune_model(
            spec, splits, specs.n_features, checkpoints, run_id, on_trial=on_trial
        )
        logger.info("tune: best parameters %s", best)
    else:
        result = train_model(spec, splits, specs.n_features, checkpoints, run_id, on_epoch=on_epoch)
    storage.write_json(result.metrics, "runs", run_id, "metrics.json")
    storage.write_json(result.history, "runs", run_id, "history.json")

    runs.update(run_id, stage="registering model")
    workdir = Path(tempfile.mkdtemp(prefix=f"mlaas4hep-{run_id}-"))
    try:
        for plot in save_plots(result.metrics, workdir / "plots"):
            storage.write_bytes(plot.read_bytes(), "runs", run_id, "plots", plot.name)
        bundle = write_bundle(
            workdir / "bundle",
            result.model_dir,
            name=spec.name,
            specs=specs.to_dict(),
            feature_names=specs.feature_names(),
            labels=_labels(spec),
            metrics=result.metrics,
            owner=owner,
            run_id=run_id,
            spec_json=spec.to_json(),
            onnx=spec.bundle.onnx,
        )
        if stage_bundle:
            # A RayJob's pods cannot write models/: the API registers the staged bundle.
            storage.upload_dir(bundle, "runs", run_id, STAGED_BUNDLE)
            version = None
        else:
            check_run_outputs(storage, run_id, owner, bundle)  # the model fits the quota
            version = ModelRegistry(storage).register(spec.name, bundle, owner=owner)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        remove_model_dir(result)
    summary_metrics = {
        f"test_{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)
    }
    if version is None:
        logger.info(
            "bundle of %s staged for registration; test metrics %s", spec.name, summary_metrics
        )
        return runs.update(run_id, stage=STAGED_STAGE, metrics=summary_metrics)
    logger.info(
        "registered %s version %d; test metrics %s", spec.name, version.version, summary_metrics
    )
    return runs.update(
        run_id,
        state=RunState.SUCCEEDED,
        stage="done",
        metrics=summary_metrics,
        model={"name": version.name, "version": version.version},
        finished=now_iso(),
    )


def _labels(spec: PipelineSpec) -> list[str]:
    """Class labels written to labels.txt: background then signal for a binary classifier."""
    labels = sorted({f.label for f in spec.files if f.label is not None})
    return [str(label) for label in labels] or ["0", "1"]
