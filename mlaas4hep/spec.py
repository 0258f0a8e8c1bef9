"""The pipeline spec: one validated description of a whole ML pipeline.

A spec is written as YAML or JSON with MLaaS4HEP's ``params.json`` key names
(``nevts``, ``chunk_size``, ``epochs``, ``batch_size``, ``branch``, ``identifier``,
``selected_branches``, ``exclude_branches``, ``redirector``, ``nan``, ``verbose``)
plus the inputs (``files`` with labels), the model and the resources to train on.
Unknown top-level keys (MLaaS4HEP's ``hist`` and friends: its params.json is flat) are
accepted with a warning, also written to the run's log; unknown keys inside the platform's
own blocks (``resources``, ``training``, ``model``, ...) are refused. MLaaS4HEP's values
are read as it writes them: ``shuffle: true/false``, ``redirector: ""``, branch lists as
strings or lists.

:func:`load_spec` reads a spec file; :func:`spec_from_mlaas4hep_inputs` builds one
from MLaaS4HEP's original ``files.txt``/``labels.txt``/``params.json``/``model.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

logger = logging.getLogger(__name__)

#: Model names become storage paths and URL segments.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Events per chunk of per-chunk training when the spec sets no ``chunk_size``.
DEFAULT_CHUNK_EVENTS = 10_000
#: Training workers of a spec that sets none, where the cluster has room for them.
DEFAULT_WORKERS = 2
#: CPUs per training worker of a spec that sets none.
DEFAULT_CPUS_PER_WORKER = 1.0
#: MLaaS4HEP's ``shuffle: true/false`` as this platform's event orders (``"blocks"``
#: permutes the chunks, seeded and streaming, as MLaaS4HEP draws its chunks at random).
SHUFFLE_OF_BOOL = {True: "blocks", False: "none"}


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, field or branch at fault."""


#: Reads a branch-list file named in a spec field: ``(path, field)`` → its names, or None
#: when there is no such file (the text is then a name). Given to :func:`parse_spec`.
NameFileReader = Callable[[str, str], "list[str] | None"]


def _read_name_file(path: str, field: str) -> list[str] | None:
    """The names in the local file ``path`` (one a line), or None when it is no file."""
    if not Path(path).is_file():
        return None
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def split_names(value: Any, reader: NameFileReader = _read_name_file, field: str = "") -> list[str]:
    """Accept a list, a comma-separated string, or the path of a file with one name a line
    (read by ``reader``)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        if "," not in value and Path(value).suffix in {".txt", ".list"}:
            names = reader(value, field)
            if names is not None:
                return names
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return [str(item).strip() for item in value if str(item).strip()]
    raise TypeError("expected a list of names, a comma-separated string or a file path")


class InputFile(BaseModel):
    """One ROOT file and, unless the spec takes labels from a branch, its class label."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Local path, root:// URL, logical /store/... name or fsspec URL")
    label: int | None = Field(default=None, description="Class label of every event in the file")


class MLPSpec(BaseModel):
    """A declarative multilayer perceptron: no model file needed."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(default=[64, 32], min_length=1)
    activation: str = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    optimizer: Literal["adam", "sgd", "rmsprop", "adamw"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0.0)

    @field_validator("layers")
    @classmethod
    def _positive_layers(cls, layers: list[int]) -> list[int]:
        if any(size < 1 for size in layers):
            raise ValueError("every layer size must be at least 1")
        return layers


class ModelSpec(BaseModel):
    """Either a Python file defining ``model(idim)`` (MLaaS4HEP convention) or an MLP block."""

    model_config = ConfigDict(extra="forbid")

    file: str | None = Field(default=None, description="Python file defining model(idim)")
    mlp: MLPSpec | None = None
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed as model(idim, **kwargs)"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if self.file and self.mlp:
            raise ValueError("give either 'file' or 'mlp', not both")
        if not self.file and self.mlp is None:
            self.mlp = MLPSpec()
        if self.kwargs and not self.file:
            raise ValueError("'kwargs' are arguments of a model file's model(idim, ...)")
        return self


class ResourcesSpec(BaseModel):
    """What the training asks Ray for."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description=f"Training workers; unset: as many as fit the cluster (at most "
        f"{DEFAULT_WORKERS}) while CPUs stay free for reading the data",
    )
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        default=None,
        gt=0.0,
        description=f"CPUs of each training worker; unset: {DEFAULT_CPUS_PER_WORKER:g}, or "
        "what the largest node has when that is less",
    )
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom Ray resources per worker"
    )
    read_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each read task asks for, e.g. {'data_node': 0.01} "
        "to read on the nodes near the data",
    )
    max_failures: int = Field(
        default=0, ge=-1, description="Worker failures to recover from (from the last checkpoint)"
    )

    @property
    def workers(self) -> int:
        """Training workers: ``num_workers``, or the default before the cluster is known."""
        return self.num_workers or DEFAULT_WORKERS

    @property
    def worker_cpus(self) -> float:
        """CPUs per worker: ``cpus_per_worker``, or the default before the cluster is known."""
        return DEFAULT_CPUS_PER_WORKER if self.cpus_per_worker is None else self.cpus_per_worker

    @model_validator(mode="after")
    def _gpu_consistency(self) -> ResourcesSpec:
        if self.use_gpu and self.gpus_per_worker == 0:
            self.gpus_per_worker = 1.0
        if self.gpus_per_worker > 0:
            self.use_gpu = True
        return self


class TrainingSpec(BaseModel):
    """How the model is fitted and evaluated."""

    model_config = ConfigDict(extra="forbid")

    validation_fraction: float = Field(default=0.2, ge=0.0, lt=0.9)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=0.9)
    seed: int = 42
    shuffle: bool = True
    early_stopping_patience: int = Field(
        default=0, ge=0, description="Stop after this many epochs without val_loss gain; 0: never"
    )
    early_stopping_min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest val_loss decrease that counts as a gain"
    )
    class_weights: dict[int, float] | None = Field(
        default=None, description="Loss weight of each class label, e.g. {0: 1.0, 1: 5.0}"
    )
    keep: Literal["last", "best"] = Field(
        default="last", description="Model kept: the last epoch's, or the lowest val_loss one"
    )
    mixed_precision: bool = Field(
        default=False, description="Compute in bfloat16 (float16 on GPUs), keep weights float32"
    )
    cache: bool = Field(
        default=True,
        description="After the first epoch, each worker keeps its flattened share of the "
        "training and validation data in memory when it fits in a quarter of its node's free "
        "memory, so later epochs do not read and flatten the files again; larger data (or "
        "false) streams from the files every epoch, in bounded memory",
    )
    mode: Literal["standard", "chunk"] = Field(
        default="standard",
        description="standard: each epoch goes over all training events; chunk: MLaaS4HEP's "
        "per-chunk training, each chunk of chunk_size events (10,000 when unset) is fitted "
        "`epochs` times in turn",
    )

    @model_validator(mode="after")
    def _fractions(self) -> TrainingSpec:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must stay below 0.9")
        return self


class TuneSpec(BaseModel):
    """A Ray Tune search over the model's parameters; the best trial's model is registered.

    ``search_space`` maps a parameter (an MLP field such as ``learning_rate`` or
    ``layers``, or a keyword argument of a model file's ``model(idim, ...)``) to a list of
    choices or to one sampler: ``{"choice": [...]}``, ``{"uniform": [low, high]}``,
    ``{"loguniform": [low, high]}``, ``{"randint": [low, high]}``.
    """

    model_config = ConfigDict(extra="forbid")

    search_space: dict[str, Any] = Field(min_length=1)
    num_samples: int = Field(default=4, ge=1, le=1000, description="Trials to run")
    metric: str = Field(default="val_loss", description="Per-epoch metric to rank trials by")
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = Field(default=1, ge=1, le=64)


class BundleSpec(BaseModel):
    """Extra formats written into the model bundle."""

    model_config = ConfigDict(extra="forbid")

    onnx: bool = Field(default=False, description="Also export model.onnx (Triton, SONIC)")


#: MLaaS4HEP params.json keys that this platform reads but does not act on.
IGNORED_MLAAS4HEP_KEYS = frozenset({"hist", "hists", "info", "fout", "fin", "preproc_file"})


class PipelineSpec(BaseModel):
    """Everything one pipeline needs: inputs, reading options, model, training, resources."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(default="model", pattern=MODEL_NAME_PATTERN, description="Model name")
    files: list[InputFile] = Field(min_length=1)
    label_branch: str | None = Field(
        default=None, description="Take each event's label from this branch instead of per file"
    )
    branch: str = Field(default="Events", min_length=1, description="TTree path in each file")
    nevts: int = Field(default=-1, ge=-1, description="Events to read in total; -1 reads all")
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="Events per read task (MLaaS4HEP's chunk, also per-chunk training's chunk); "
        "unset: each task reads whole ROOT clusters worth about 64 MB of uncompressed events",
    )
    epochs: int = Field(default=5, ge=1, le=10_000)
    batch_size: int = Field(default=256, ge=1)
    identifier: list[str] = Field(
        default_factory=list, description="Branches read but kept out of the features"
    )
    selected_branches: list[str] = Field(default_factory=list)
    exclude_branches: list[str] = Field(default_factory=list)
    redirector: str | None = Field(
        # On a cluster the platform's default points at its XRootD proxy-cache.
        default_factory=lambda: os.environ.get("MLAAS4HEP_REDIRECTOR") or None,
        description="Prefix turning logical /store/... names into root:// URLs "
        "(default: MLAAS4HEP_REDIRECTOR)",
    )
    nan: float = Field(default=math.nan, description="Padding value of jagged slots")
    max_jagged_dim: int | None = Field(
        default=None, ge=1, description="Cap on the slots kept per jagged branch (jdim)"
    )
    preproc: str | dict[str, Any] | None = Field(
        default=None,
        description="MLaaS4HEP preprocessing: new branches, cuts (a JSON file path or mapping)",
    )
    specs: str | None = Field(
        default=None,
        description="A specs.json to reuse when it was computed from the same inputs",
    )
    shuffle: Literal["none", "blocks", "global"] = Field(
        default="none",
        description=(
            "Event order: 'none' interleaves the files' chunks in proportion to their sizes, "
            "'blocks' also permutes the chunks (seeded, streaming), 'global' shuffles every "
            "event (an all-to-all exchange)"
        ),
    )
    cache_events: Literal["auto", "always", "never"] = Field(
        default="auto",
        description=(
            "Read the files once into Ray's object store and reuse the events for the specs "
            "pass, flattening and every epoch: 'auto' does when they take at most a quarter "
            "of the object store, 'never' streams them from the files on every pass"
        ),
    )
    verbose: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tune: TuneSpec | None = Field(default=None, description="Hyperparameter search (optional)")
    bundle: BundleSpec = Field(default_factory=BundleSpec)

    @field_validator("identifier", "selected_branches", "exclude_branches", mode="before")
    @classmethod
    def _names(cls, value: Any, info: ValidationInfo) -> list[str]:
        reader = (info.context or {}).get("name_files") or _read_name_file
        return split_names(value, reader, info.field_name or "")

    @model_validator(mode="before")
    @classmethod
    def _labels_list(cls, data: Any) -> Any:
        """``labels: [...]`` beside ``files`` gives one label per file, in order."""
        if not isinstance(data, dict) or "labels" not in data:
            return data
        data = dict(data)
        labels, files = data.pop("labels"), data.get("files")
        files = [files] if isinstance(files, str) else files
        if not isinstance(labels, list) or not isinstance(files, list):
            raise ValueError("labels: give a list with one label per entry of files")
        if len(labels) != len(files):
            raise ValueError(
                f"labels: {len(labels)} labels for {len(files)} files; give one label per file"
            )
        data["files"] = [
            {"path": item, "label": label} if isinstance(item, str) else {**item, "label": label}
            for item, label in zip(files, labels, strict=True)
        ]
        return data

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value

    @field_validator("shuffle", mode="before")
    @classmethod
    def _shuffle(cls, value: Any) -> Any:
        """MLaaS4HEP's ``shuffle: true/false`` as the platform's modes (:data:`SHUFFLE_OF_BOOL`)."""
        return SHUFFLE_OF_BOOL[value] if isinstance(value, bool) else value

    @field_validator("redirector", mode="before")
    @classmethod
    def _redirector(cls, value: Any) -> Any:
        """MLaaS4HEP's ``redirector: ""`` (no prefix) as no redirector."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("nan", mode="before")
    @classmethod
    def _nan(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in {"nan", "np.nan"}):
            return math.nan
        return value

    @model_validator(mode="after")
    def _labels(self) -> PipelineSpec:
        if self.label_branch is None:
            missing = [f.path for f in self.files if f.label is None]
            if missing:
                raise ValueError(
                    "every file needs a label (or set label_branch); no label for: "
                    + ", ".join(missing)
                )
        message = self.unused_keys_message()
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning("%s", message)
        return self

    def unused_keys_message(self) -> str | None:
        """A warning naming the spec's top-level keys this platform does not use (accepted
        and ignored, e.g. MLaaS4HEP's ``hist``), or None when there are none."""
        unknown = sorted(set(self.model_extra or {}))
        if not unknown:
            return None
        known = [k for k in unknown if k in IGNORED_MLAAS4HEP_KEYS]
        other = [k for k in unknown if k not in IGNORED_MLAAS4HEP_KEYS]
        parts = [f"MLaaS4HEP keys with no use here: {', '.join(known)}"] if known else []
        parts += [f"unknown keys: {', '.join(other)}"] if other else []
        return "spec keys accepted and ignored: " + "; ".join(parts)

    @property
    def chunk_events(self) -> int:
        """Events per chunk of per-chunk training: ``chunk_size``, or MLaaS4HEP's 10,000."""
        return self.chunk_size or DEFAULT_CHUNK_EVENTS

    def resolved_paths(self) -> list[str]:
        """Return each file's path, with logical ``/store/...`` names put behind the redirector."""
        return [resolve_path(f.path, self.redirector) for f in self.files]

    def to_json(self) -> str:
        """Serialize to JSON (NaN padding written as the string ``"nan"``)."""
        data = self.model_dump(mode="json")
        if isinstance(self.nan, float) and math.isnan(self.nan):
            data["nan"] = "nan"
        return json.dumps(data, indent=2, sort_keys=True)


#: Relative names that name the caller's files on the platform, never the redirector's.
_PLATFORM_PREFIXES = ("uploads/", "runs/")


def behind_redirector(path: str, redirector: str | None) -> bool:
    """True when ``path`` is read through ``redirector``: a logical ``/store/...`` name, or
    (as MLaaS4HEP's reader does) a relative name that is no local file, URL or platform
    name (``uploads/...``, ``runs/...``)."""
    if not redirector or _is_url(path):
        return False
    if path.startswith("/"):
        return path.startswith("/store/")
    return not path.startswith(_PLATFORM_PREFIXES)


def resolve_path(path: str, redirector: str | None) -> str:
    """``path`` as a ``root://`` URL behind ``redirector`` when :func:`behind_redirector`
    says so (``redirector/path``, as MLaaS4HEP joins them), else ``path`` itself."""
    if behind_redirector(path, redirector):
        return redirector.rstrip("/") + "/" + path
    return path


def _format_validation_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "spec"
        parts.append(f"{where}: {item['msg']}")
    return f"{source}: invalid spec: " + "; ".join(parts)


def parse_spec(
    data: dict[str, Any], source: str = "spec", name_files: NameFileReader | None = None
) -> PipelineSpec:
    """Validate a spec mapping; raise :class:`SpecError` naming each bad field.

    Branch lists given as file paths are read by ``name_files`` (default: local files;
    the API passes its data-access policy's reader).
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of keys to values")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PipelineSpec.model_validate(data, context={"name_files": name_files})
    except ValidationError as error:
        raise SpecError(_format_validation_error(error, source)) from None


def read_spec_text(text: str, source: str) -> dict[str, Any]:
    """Parse YAML or JSON text (JSON is YAML) into a mapping; errors name ``source``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: not valid YAML or JSON: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of keys to values")
    return data


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML or JSON spec file.

    Relative file and model paths in the spec are taken relative to the spec's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    data = read_spec_text(path.read_text(), str(path))
    return parse_spec(_relative_to(data, path.parent), str(path))


def _is_url(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def _relative_to(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make local relative paths of files and the model file absolute against ``base``.

    ``uploads/<path>`` names with no such local file stay as they are: they name the
    caller's uploaded files on the platform. With a ``redirector``, so do file names with
    no such local file: the redirector serves them (:func:`resolve_path`), as in MLaaS4HEP.
    """
    redirector = data.get("redirector")

    def fix(path: str) -> str:
        if _is_url(path) or path.startswith("/"):
            return path
        if path.startswith("uploads/") and not (base / path).exists():
            return path
        return str((base / path).resolve())

    def fix_file(path: str) -> str:
        if isinstance(redirector, str) and redirector.strip() and not (base / path).exists():
            return path
        return fix(path)

    data = dict(data)
    files = data.get("files")
    if isinstance(files, str):
        files = [files]
    if isinstance(files, list):
        data["files"] = [
            fix_file(item)
            if isinstance(item, str)
            else (
                {**item, "path": fix_file(item["path"])}
                if isinstance(item, dict) and "path" in item
                else item
            )
            for item in files
        ]
    for key in ("specs", "preproc"):
        if isinstance(data.get(key), str):
            data[key] = fix(data[key])
    for key in ("selected_branches", "exclude_branches", "identifier"):
        value = data.get(key)
        if isinstance(value, str) and _names_a_file_below(value, base):
            data[key] = str(base / value)
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = fix(model)
    elif isinstance(model, dict) and isinstance(model.get("file"), str):
        data["model"] = {**model, "file": fix(model["file"])}
    return data


def _names_a_file_below(value: str, base: Path) -> bool:
    """True when ``value`` is a relative branch-list file name of a file below ``base``."""
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or "," in value:
        return False
    return Path(value).suffix in {".txt", ".list"} and (base / value).is_file()


def read_json_object(path: Path, what: str, error: type[Exception] = SpecError) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it is missing or not one."""
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise SpecError(f"{path}: {what} file not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and ln[0] != "#"]


def spec_from_mlaas4hep_inputs(
    files: str | Path,
    labels: str | Path | None,
    params: str | Path,
    model: str | Path | None = None,
    preproc: str | Path | None = None,
    name_files: NameFileReader | None = None,
) -> PipelineSpec:
    """Build a spec from MLaaS4HEP's original inputs, used as they are.

    ``files.txt`` lists one ROOT file a line, ``labels.txt`` one label a line (the same
    count), ``params.json`` holds MLaaS4HEP's parameters and ``model.py`` defines
    ``model(idim)``. A missing ``labels`` means the label comes from ``label_branch``
    in params.json. ``name_files`` reads branch-list files (see :func:`parse_spec`).
    """
    files_path, params_path = Path(files), Path(params)
    file_list = _read_lines(files_path, "files")
    data: dict[str, Any] = read_json_object(params_path, "params")
    if labels is not None:
        label_list = _read_lines(Path(labels), "labels")
        if len(label_list) != len(file_list):
            raise SpecError(
                f"{labels}: {len(label_list)} labels for {len(file_list)} files in {files}; "
                "give one label per file"
            )
        try:
            label_values = [int(float(x)) for x in label_list]
        except ValueError:
            raise SpecError(f"{labels}: labels must be integers") from None
        data["files"] = [
            {"path": p, "label": lab} for p, lab in zip(file_list, label_values, strict=True)
        ]
    else:
        data["files"] = file_list
    data = _relative_to(data, files_path.parent)
    if model is not None:
        data["model"] = str(Path(model).resolve())
    if preproc is not None:
        data["preproc"] = str(Path(preproc).resolve())
    return parse_spec(data, str(params_path), name_files)
