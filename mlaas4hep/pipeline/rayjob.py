"""Pipelines as KubeRay ``RayJob`` objects: one Ray cluster per run, holding no platform secret.

With ``job_backend: rayjob`` the pipeline API does not hand a run to the Jobs API of its
own cluster (whose pods hold the Ray token, the OIDC settings and the storage
credentials). It creates one ``RayJob`` per run, rendered by :func:`render_rayjob` from a
fixed template and values checked here (run id, owner id, model name, resources, operator
settings; never a user string unchecked):

- the pods use the service account ``rayjob_service_account`` with no token mounted
  (``automountServiceAccountToken: false``), carry no ``secretRef``/``secretKeyRef`` and
  of the platform's settings only the storage path and the data and sandbox rules
  (:data:`JOB_SETTINGS`); KubeRay gives the run's cluster a Ray token of its own, which
  opens that one cluster only;
- the storage volume is mounted as a per-run view: ``runs/<run_id>`` read-write, the
  run's ``spec.json``, ``model.py``, ``inputs/`` and ``submission.json``, the owner's
  ``uploads/<owner>`` and the shared data roots read-only; ``models/``, other runs and
  other tenants' uploads are not in the pods;
- the pods are labelled ``mlaas4hep.io/role: pipeline``, which the NetworkPolicy
  ``pipeline-isolation`` (``k8s/base/pipelines/``) narrows to DNS, pipeline pods and the
  XRootD proxy-cache; a NetworkPolicy per RayJob (:func:`render_network_policy`, owned by
  it) admits the pods of one run to each other only;
- the cluster is deleted when the job ends (``shutdownAfterJobFinishes``) and the RayJob
  ``ttlSecondsAfterFinished`` later.

Since the job cannot write ``models/``, it stages its bundle in ``runs/<run_id>/bundle``
(:data:`STAGED_BUNDLE`) and the API registers it when it sees the RayJob succeeded
(:func:`register_staged_bundle`), under the owner and model name it wrote into the
RayJob's annotations at submission (pods cannot change them: they hold no API token).

:class:`KubernetesApi` talks plain HTTPS to the API server with the API pod's own
service-account token (no ``kubernetes`` client library); the Role of
``k8s/base/pipelines/rbac.yaml`` lets it create, get and delete ``rayjobs`` and create
``networkpolicies``, nothing else. None of this has run against a real cluster here:
the tests check the requests against a loopback stand-in of the API server and the
rendered RayJob against KubeRay's CRD schema.
Batch predictions (no user code) keep running as Ray Jobs of the platform's cluster.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from mlaas4hep.pipeline.jobs import JOB_TO_RUN_STATE, JobView, PipelineJobs
from mlaas4hep.settings import Settings
from mlaas4hep.spec import ResourcesSpec
from mlaas4hep.store.registry import ModelRegistry, RegistryError, check_model_name
from mlaas4hep.store.runs import RunState, RunStore, check_run_id, now_iso
from mlaas4hep.store.storage import Storage

#: Where Kubernetes mounts a pod's service-account token, CA bundle and namespace.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RAYJOB_API_VERSION = "ray.io/v1"
ROLE_LABEL = "mlaas4hep.io/role"
PIPELINE_ROLE = "pipeline"
RUN_LABEL = "mlaas4hep.io/run-id"
OWNER_ANNOTATION = "mlaas4hep.io/owner"
MODEL_ANNOTATION = "mlaas4hep.io/model"
JOB_ANNOTATION = "mlaas4hep.io/job-id"
#: Folder of ``runs/<run_id>/`` where a RayJob leaves its bundle, and the run's stage then.
STAGED_BUNDLE = "bundle"
STAGED_STAGE = "bundle staged"
_CLAIMED_BUNDLE = ".registering"
#: Marker of the replica registering a staged bundle on an object store.
_CLAIM_MARKER = ".registering.claim"
#: Files of the run folder the API wrote before the job: mounted read-only in the pods.
READ_ONLY_RUN_FILES = ("spec.json", "model.py", "inputs", "submission.json")
#: The API's record of who submitted a run (``status.json`` is the job's to write).
SUBMISSION = "submission.json"
#: Operator settings the pipeline needs inside its pods (none of them a secret): which
#: data it may read and how the model sandbox runs. Nothing else of the API's settings.
JOB_SETTINGS = (
    "shared_data_roots",
    "allowed_data_hosts",
    "model_sandbox",
    "sandbox_timeout_s",
    "sandbox_max_output_bytes",
    "allowed_model_layers",
)
#: Where the pods' image keeps its Python and the pipeline's scratch space.
PYTHON = "python"
SCRATCH = "/tmp"

#: Pipeline job ids: a run id, or ``<run_id>-r<n>`` for a resumed run.
_JOB_ID = re.compile(r"^(?P<run>run-[0-9]{8}-[0-9]{6}-[0-9a-f]{6})(-r[0-9]{1,4})?$")
#: :func:`mlaas4hep.auth.oidc.owner_id`'s shape: readable part, dash, 10 hex digits.
_OWNER = re.compile(r"^[A-Za-z0-9_.-]{1,40}-[0-9a-f]{10}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
_RESOURCE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_REDIRECTOR = re.compile(r"^root://[A-Za-z0-9.-]+(:[0-9]{1,5})?/+$")
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SECCOMP_LOCALHOST = re.compile(r"^localhost/[A-Za-z0-9._/-]{1,200}$")
_RESERVED_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class RayJobError(ValueError):
    """A RayJob could not be rendered or the Kubernetes API refused a request."""


def pipeline_job_id(job_id: str) -> str | None:
    """The run id of a pipeline job id (``run-…`` or ``run-…-r<n>``), else ``None``."""
    match = _JOB_ID.fullmatch(job_id or "")
    return match["run"] if match else None


def _checked(pattern: re.Pattern[str], value: str | None, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RayJobError(f"{what} {value!r} is not allowed in a RayJob ({pattern.pattern})")
    return value


def _resource_name(name: str, where: str) -> str:
    if not _RESOURCE.fullmatch(name) or name in _RESERVED_RESOURCES:
        raise RayJobError(f"{where}: custom resource {name!r} is not allowed in a RayJob")
    return name


def _amount(value: float, where: str) -> float:
    if not math.isfinite(value) or value <= 0 or value > 10_000:
        raise RayJobError(f"{where}: amount {value!r} is not a positive number up to 10000")
    return float(value)


def _quoted_resources(resources: dict[str, float]) -> str:
    """``rayStartParams.resources`` as KubeRay takes it: a quoted JSON object."""
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


@dataclass(frozen=True)
class StorageView:
    """The storage volume and the folder of the storage root inside it."""

    claim: str
    mount: str
    root: str  # the storage root path in the platform's pods, e.g. /data/mlaas4hep
    sub_path: str  # the same folder relative to the volume, e.g. mlaas4hep

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageView:
        """The view of ``settings.storage``; RayJobError unless it is a folder on the claim."""
        root = settings.storage.removeprefix("file://")
        if "://" in root:
            raise RayJobError(
                f"storage {settings.storage!r}: the rayjob backend mounts the storage volume "
                "per run; object storage would need per-run credentials (docs/security.md)"
            )
        mount = PurePosixPath(settings.rayjob_storage_mount)
        path = PurePosixPath(os.path.normpath(root))
        if not mount.is_absolute() or ".." in path.parts or not path.is_relative_to(mount):
            raise RayJobError(f"storage {root!r} is not below rayjob_storage_mount {str(mount)!r}")
        claim = _checked(_DNS_NAME, settings.rayjob_storage_claim, "rayjob_storage_claim")
        return cls(claim, str(mount), str(path), str(path.relative_to(mount)))

    def mount_of(self, *parts: str, read_only: bool) -> dict[str, Any]:
        """A volumeMount showing ``<storage>/<parts>`` at the same path as in the API pods."""
        rel = "/".join(parts)
        sub = rel if self.sub_path == "." else f"{self.sub_path}/{rel}"
        return {
            "name": "storage",
            "mountPath": f"{self.root}/{rel}",
            "subPath": sub,
            "readOnly": read_only,
        }

    def shared_mounts(self, roots: list[str]) -> list[dict[str, Any]]:
        """Read-only volumeMounts of the operator's shared data roots (``shared_data_roots``).

        Each must be a folder on the storage volume, outside ``runs/``, ``models/`` and
        ``uploads/``: RayJobError names any other, since a RayJob's pods could not read it.
        """
        storage_root, mount = PurePosixPath(self.root), PurePosixPath(self.mount)
        private = [storage_root / part for part in ("runs", "models", "uploads")]
        mounts = []
        for root in roots:
            path = PurePosixPath(os.path.normpath(root.removeprefix("file://")))
            if (
                "://" in root
                or not path.is_relative_to(mount)
                or storage_root.is_relative_to(path)  # it would show the whole storage
                or any(path.is_relative_to(folder) for folder in private)
            ):
                raise RayJobError(
                    f"shared_data_roots: {root!r} is not a folder of the storage volume "
                    f"({self.mount}) outside the platform's runs/, models/ and uploads/: a "
                    "pipeline RayJob cannot be shown it (docs/security.md)"
                )
            rel = str(path.relative_to(mount))
            mounts.append(
                {"name": "storage", "mountPath": str(path), "subPath": rel, "readOnly": True}
            )
        return mounts


def _security(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts of the pipeline pods."""
    profile = settings.rayjob_seccomp_profile
    if profile == "RuntimeDefault":
        seccomp: dict[str, Any] = {"type": "RuntimeDefault"}
    else:
        _checked(_SECCOMP_LOCALHOST, profile, "rayjob_seccomp_profile")
        seccomp = {"type": "Localhost", "localhostProfile": profile.removeprefix("localhost/")}
    pod = {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 100, "seccompProfile": seccomp}
    container: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if settings.rayjob_pod_user_namespace:
        # bwrap mounts a fresh /proc: the kernel refuses it while the runtime masks paths
        # of the container's /proc, which it may unmask only in a user-namespaced pod.
        container["procMount"] = "Unmasked"
    return pod, container


def _job_env(settings: Settings, storage: StorageView) -> list[dict[str, str]]:
    """The pods' environment: fixed names, values from the operator's settings only."""
    env = {
        "MLAAS4HEP_STORAGE": storage.root,
        "MLAAS4HEP_HOME": f"{SCRATCH}/mlaas4hep",
        "MLAAS4HEP_JOB_BACKEND": "rayjob",
        "TF_USE_LEGACY_KERAS": "1",
    }
    redirector = os.environ.get("MLAAS4HEP_REDIRECTOR")
    if redirector:
        env["MLAAS4HEP_REDIRECTOR"] = _checked(_REDIRECTOR, redirector, "MLAAS4HEP_REDIRECTOR")
    values = settings.model_dump(include=set(JOB_SETTINGS), exclude_defaults=True)
    for name, value in values.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        env[f"MLAAS4HEP_{name.upper()}"] = text
    return [{"name": name, "value": value} for name, value in env.items()]


def _pod_template(
    settings: Settings,
    storage: StorageView,
    container_name: str,
    image: str,
    resources: dict[str, Any],
    mounts: list[dict[str, Any]],
    labels: dict[str, str],
    gpu: bool = False,
) -> dict[str, Any]:
    """A pod template of a RayJob's head or worker group: no token, no secret."""
    pod_security, container_security = _security(settings)
    spec: dict[str, Any] = {
        "serviceAccountName": _checked(
            _DNS_NAME, settings.rayjob_service_account, "rayjob_service_account"
        ),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security,
        "containers": [
            {
                "name": container_name,
                "image": image,
                "env": _job_env(settings, storage),
                "resources": {"requests": dict(resources), "limits": dict(resources)},
                "securityContext": container_security,
                "volumeMounts": [
                    *(dict(mount) for mount in mounts),
                    {"name": "scratch", "mountPath": SCRATCH},
                ],
            }
        ],
        "volumes": [
            {
                "name": "storage",
                "persistentVolumeClaim": {"claimName": storage.claim},
            },
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if settings.rayjob_pod_user_namespace:
        spec["hostUsers"] = False
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _pod_resources(settings: Settings, cpus: float, gpus: int = 0) -> dict[str, Any]:
    """Requests (= limits) of one pod: whole CPUs, as its Ray node advertises them."""
    whole = math.ceil(cpus)
    memory_mib = math.ceil(whole * settings.rayjob_memory_per_cpu_gib * 1024)
    resources: dict[str, Any] = {"cpu": str(whole), "memory": f"{memory_mib}Mi"}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    return resources


def rayjob_name(job_id: str) -> str:
    """Name of the RayJob of a pipeline job id (RayJobError for any other id)."""
    if pipeline_job_id(job_id) is None:
        raise RayJobError(f"job id {job_id!r} is not a pipeline job id")
    return f"mlaas4hep-{job_id}"


def render_rayjob(
    settings: Settings,
    job_id: str,
    owner: str,
    model_name: str,
    resources: ResourcesSpec,
    read_only_files: tuple[str, ...] = ("spec.json",),
) -> dict[str, Any]:
    """The RayJob object that runs the pipeline job ``job_id`` (a run id, or its resume id).

    ``owner`` is the platform's owner id, ``model_name`` the spec's (checked) name,
    ``resources`` the spec's checked resources, ``read_only_files`` the names of
    :data:`READ_ONLY_RUN_FILES` present in the run's folder. Raises :class:`RayJobError`
    naming the value that does not fit.
    """
    name = rayjob_name(job_id)
    run_id = check_run_id(pipeline_job_id(job_id) or "")
    _checked(_OWNER, owner, "owner")
    try:
        check_model_name(model_name)
    except RegistryError as error:
        raise RayJobError(str(error)) from None
    image = _checked(_IMAGE, settings.rayjob_image, "rayjob_image")
    gpu_image = _checked(_IMAGE, settings.rayjob_gpu_image or image, "rayjob_gpu_image")
    storage = StorageView.from_settings(settings)
    unknown = set(read_only_files) - set(READ_ONLY_RUN_FILES)
    if unknown:
        raise RayJobError(f"run files {sorted(unknown)} cannot be mounted read-only")

    mounts = [
        storage.mount_of("runs", run_id, read_only=False),
        *(storage.mount_of("runs", run_id, name, read_only=True) for name in read_only_files),
        storage.mount_of("uploads", owner, read_only=True),
        *storage.shared_mounts(settings.shared_data_roots),
    ]
    labels = {ROLE_LABEL: PIPELINE_ROLE, RUN_LABEL: run_id}
    read = {
        _resource_name(k, "resources.read_resources"): max(
            1.0, _amount(v, "resources.read_resources")
        )
        for k, v in resources.read_resources.items()
    }
    per_worker = {
        _resource_name(k, "resources.resources_per_worker"): _amount(
            v, "resources.resources_per_worker"
        )
        for k, v in resources.resources_per_worker.items()
    }
    workers = resources.workers
    cpus = _amount(resources.worker_cpus, "resources.cpus_per_worker")
    gpus = math.ceil(resources.gpus_per_worker) if resources.use_gpu else 0
    worker_params: dict[str, str] = {"num-cpus": str(math.ceil(cpus))}
    if gpus:
        worker_params["num-gpus"] = str(gpus)
    if read or per_worker:
        worker_params["resources"] = _quoted_resources({**read, **per_worker})
    head_params = {"num-cpus": str(settings.rayjob_head_cpus), "dashboard-host": "0.0.0.0"}
    if read:
        head_params["resources"] = _quoted_resources(read)

    spec_path = f"{storage.root}/runs/{run_id}/spec.json"
    entrypoint = [PYTHON, "-m", "mlaas4hep.cli.main", "run", spec_path, "--run-id", run_id]
    namespace = settings_namespace(settings)
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/part-of": "mlaas4hep",
                ROLE_LABEL: "pipeline-job",
                RUN_LABEL: run_id,
            },
            "annotations": {
                OWNER_ANNOTATION: owner,
                MODEL_ANNOTATION: model_name,
                JOB_ANNOTATION: job_id,
            },
        },
        "spec": {
            "entrypoint": shlex.join([*entrypoint, "--owner", owner]),
            "jobId": job_id,
            "metadata": {"owner": owner, "run_id": run_id, "app": "mlaas4hep"},
            # The operator submits through the run cluster's dashboard: no submitter pod.
            "submissionMode": "HTTPMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": settings.rayjob_ttl_seconds,
            "backoffLimit": 0,
            "rayClusterSpec": {
                # KubeRay makes a token for this cluster alone: not the platform's.
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": head_params,
                    "template": _pod_template(
                        settings,
                        storage,
                        "ray-head",
                        image,
                        _pod_resources(settings, settings.rayjob_head_cpus),
                        mounts,
                        labels,
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "train",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": worker_params,
                        "template": _pod_template(
                            settings,
                            storage,
                            "ray-worker",
                            gpu_image if gpus else image,
                            _pod_resources(settings, cpus, gpus),
                            mounts,
                            labels,
                            gpu=bool(gpus),
                        ),
                    }
                ],
            },
        },
    }


def render_network_policy(settings: Settings, job_id: str, rayjob_uid: str) -> dict[str, Any]:
    """The NetworkPolicy that lets the pods of one pipeline job reach each other only.

    The base policy ``pipeline-isolation`` admits no traffic between pipeline pods; this
    one admits it between the pods of ``job_id``'s run. It is owned by the RayJob
    (``rayjob_uid``), so Kubernetes deletes it with the RayJob.
    """
    name = rayjob_name(job_id)
    run_id = check_run_id(pipeline_job_id(job_id) or "")
    _checked(_UID, rayjob_uid, "RayJob uid")
    run_pods = {"matchLabels": {ROLE_LABEL: PIPELINE_ROLE, RUN_LABEL: run_id}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": settings_namespace(settings),
            "labels": {"app.kubernetes.io/part-of": "mlaas4hep", RUN_LABEL: run_id},
            "ownerReferences": [
                {
                    "apiVersion": RAYJOB_API_VERSION,
                    "kind": "RayJob",
                    "name": name,
                    "uid": rayjob_uid,
                }
            ],
        },
        "spec": {
            "podSelector": run_pods,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": run_pods}]}],
        },
    }


def settings_namespace(settings: Settings, service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    """The RayJobs' namespace: ``kubernetes_namespace``, else the pod's own, else ``default``."""
    namespace = settings.kubernetes_namespace
    if not namespace:
        file = service_account_dir / "namespace"
        namespace = file.read_text().strip() if file.is_file() else "default"
    return _checked(_DNS_LABEL, namespace, "kubernetes_namespace")


class KubernetesApi:
    """Plain HTTPS to the Kubernetes API server with a service-account token.

    The token is read from ``token_file`` on every request (Kubernetes rotates bound
    tokens); the server's certificate is checked against ``ca_file`` when it exists.
    """

    def __init__(
        self,
        base_url: str,
        token_file: Path = SERVICE_ACCOUNT_DIR / "token",
        ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt",
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        verify: Any = str(ca_file) if ca_file.is_file() else True
        self._client = httpx.Client(base_url=self.base_url, verify=verify, timeout=timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """Send one request (``path`` below the server's URL); the response, any status."""
        try:
            token = self.token_file.read_text().strip()
        except OSError as error:
            raise RayJobError(f"no service-account token at {self.token_file}: {error}") from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            return self._client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as error:
            raise RayJobError(f"Kubernetes API {self.base_url}: {method} {path}: {error}") from None


def _state(status: dict[str, Any]) -> tuple[str, str]:
    """(run state, message) of a RayJob's ``status``."""
    message = str(status.get("message") or status.get("reason") or "")
    if status.get("jobDeploymentStatus") == "Failed":
        return "FAILED", message or "the RayJob failed"
    states = {str(job_state.value): run for job_state, run in JOB_TO_RUN_STATE.items()}
    return states.get(str(status.get("jobStatus") or ""), "PENDING"), message


class RayJobBackend(PipelineJobs):
    """The job backend of ``job_backend: rayjob``.

    Pipeline job ids go to RayJobs; other jobs (batch predictions, which run no user
    code) to :class:`PipelineJobs`, the Jobs API of the platform's own cluster.
    """

    def __init__(self, settings: Settings, api: KubernetesApi | None = None) -> None:
        super().__init__(settings.jobs_url)
        self.settings = settings
        self.storage = Storage(settings.storage)
        self.api = api or KubernetesApi(settings.kubernetes_api_url)

    def _path(self, name: str = "", api: str = RAYJOB_API_VERSION, kind: str = "rayjobs") -> str:
        namespace = settings_namespace(self.settings)
        return f"/apis/{api}/namespaces/{namespace}/{kind}" + (f"/{name}" if name else "")

    def _create(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        response = self.api.request("POST", path, body)
        if response.status_code not in (200, 201, 202):
            raise _refused(f"{body['kind']} {body['metadata']['name']}", response)
        return response.json()

    def render(self, run_id: str, owner: str, job_id: str | None = None) -> dict[str, Any]:
        """The RayJob of the run ``run_id``, from the spec the API stored for it.

        A resumed run reads the same ``spec.json``: the run's pods see it read-only.
        """
        spec = json.loads(self.storage.read_text("runs", check_run_id(run_id), "spec.json"))
        present = tuple(n for n in READ_ONLY_RUN_FILES if self.storage.exists("runs", run_id, n))
        return render_rayjob(
            self.settings,
            job_id or run_id,
            owner,
            str(spec.get("name", "")),
            ResourcesSpec.model_validate(spec.get("resources") or {}),
            present,
        )

    def submit(
        self, run_id: str, owner: str, spec_uri: str, job_id: str | None = None, **options: Any
    ) -> str:
        """Create the RayJob of a pipeline run; return its job id.

        Other jobs (an ``entrypoint`` in ``options``, a non-pipeline id) are Ray Jobs.
        """
        if options.get("entrypoint") is not None or pipeline_job_id(job_id or run_id) is None:
            return super().submit(run_id, owner, spec_uri, job_id=job_id, **options)
        job_id = job_id or run_id
        self._check_owner(run_id, owner, first=job_id == run_id)
        created = self._create(self.render(run_id, owner, job_id), self._path())
        uid = str((created.get("metadata") or {}).get("uid", ""))
        try:
            policy = render_network_policy(self.settings, job_id, uid)
            self._create(policy, self._path(api="networking.k8s.io/v1", kind="networkpolicies"))
        except RayJobError:
            self._delete(job_id)  # its pods could not talk to each other
            raise
        return job_id

    def _check_owner(self, run_id: str, owner: str, first: bool) -> None:
        """Record ``owner`` for the first job of a run; check it for a resumed one.

        A resume takes its owner from the run's ``status.json``, which the run's earlier
        job could write: the owner recorded at submission (read-only in the pods) wins.
        """
        if first:  # nothing of the tenant's has run yet: the folder holds what the API wrote
            self.storage.write_json({"owner": owner, "run_id": run_id}, "runs", run_id, SUBMISSION)
            return
        try:
            recorded = self.storage.read_json("runs", run_id, SUBMISSION).get("owner")
        except (FileNotFoundError, ValueError, AttributeError):
            recorded = None
        if recorded != owner:
            raise RayJobError(
                f"run {run_id}: its record names the owner {owner!r} but it was submitted by "
                f"{recorded!r}: not resumed"
            )

    def view(self, job_id: str) -> JobView | None:
        """What the RayJob's status says, or ``None`` when it does not exist (any more)."""
        if pipeline_job_id(job_id) is None:
            return super().view(job_id)
        response = self.api.request("GET", self._path(rayjob_name(job_id)))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _refused(f"RayJob {rayjob_name(job_id)}", response)
        obj = response.json()
        state, message = _state(obj.get("status") or {})
        meta = obj.get("metadata") or {}
        annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
        metadata = {
            "owner": annotations.get(OWNER_ANNOTATION, ""),
            "model": annotations.get(MODEL_ANNOTATION, ""),
            "run_id": labels.get(RUN_LABEL, ""),
            "app": "mlaas4hep",
        }
        return JobView(job_id=job_id, state=state, message=message, metadata=metadata)

    def logs(self, job_id: str) -> str:
        """Empty for a RayJob: the run's log is read from ``runs/<id>/log`` in storage."""
        if pipeline_job_id(job_id) is None:
            return super().logs(job_id)
        return ""

    def stop(self, job_id: str) -> bool:
        """Delete the RayJob (and with it its cluster); ``False`` when it did not exist."""
        if pipeline_job_id(job_id) is None:
            return super().stop(job_id)
        return self._delete(job_id)

    def delete(self, job_id: str) -> None:
        if pipeline_job_id(job_id) is None:
            super().delete(job_id)
            return
        self._delete(job_id)

    def _delete(self, job_id: str) -> bool:
        path = self._path(rayjob_name(job_id)) + "?propagationPolicy=Background"
        response = self.api.request("DELETE", path)
        if response.status_code == 404:
            return False
        if response.status_code not in (200, 202):
            raise _refused(f"RayJob {rayjob_name(job_id)}", response)
        return True


def _refused(what: str, response: httpx.Response) -> RayJobError:
    """The error for an answer of the API server that is not a success."""
    try:
        message = str(response.json().get("message") or response.text[:300])
    except (ValueError, AttributeError):
        message = response.text[:300]
    return RayJobError(f"{what}: the Kubernetes API answered {response.status_code}: {message}")


def check_plain_tree(folder: Path) -> None:
    """RayJobError unless ``folder`` holds only plain folders and regular files.

    A staged bundle was written by the tenant's job: a symlink in it could point the
    registering API at files of the API's own pod or of other tenants.
    """
    if folder.is_symlink() or not folder.is_dir():
        raise RayJobError(f"staged bundle {folder.name}: not a plain folder")
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise RayJobError(
                    f"staged bundle: {path.relative_to(folder)} is not a regular file or folder"
                )


def register_staged_bundle(
    storage: Storage, runs: RunStore, run_id: str, job: JobView
) -> dict[str, Any] | None:
    """Register the bundle a succeeded RayJob staged in ``runs/<run_id>/bundle``.

    The owner and model name come from ``job.metadata`` (the RayJob's annotations, which
    only the API writes), never from the run's folder. The bundle is first renamed to a
    claim so one replica registers it; its ``metadata.json`` gets the true owner and run
    id. Returns the run's updated record (FAILED when the registry refuses the bundle),
    the unchanged record while another replica registers it, or ``None`` when nothing
    was staged.
    """
    check_run_id(run_id)
    owner, name = job.metadata.get("owner", ""), job.metadata.get("model", "")
    if job.metadata.get("run_id") != run_id or pipeline_job_id(job.job_id) != run_id:
        # The run's folder names its job: a job id of another run must not lend its owner.
        return None
    staged = storage.path("runs", run_id, STAGED_BUNDLE)
    claim = ("runs", run_id, _CLAIMED_BUNDLE)
    try:
        # Only one replica wins the claim: a rename is atomic on a shared volume; an object
        # store moves a folder object by object, so a marker created only-if-absent (a
        # conditional PUT) decides there first.
        if storage.is_local:
            os.rename(staged, storage.path(*claim))
        elif not storage.exists("runs", run_id, STAGED_BUNDLE):
            return None
        elif storage.create_exclusive(run_id.encode(), "runs", run_id, _CLAIM_MARKER):
            storage.fs.mv(staged, storage.path(*claim), recursive=True)
        else:
            return runs.get(run_id)
    except OSError:
        return runs.get(run_id) if storage.exists(*claim) else None
    try:
        _checked(_OWNER, owner, "RayJob owner annotation")
        with storage.local_copy(*claim) as local:
            check_plain_tree(local)
            meta_file = local / "metadata.json"
            metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            if not isinstance(metadata, dict):
                raise RayJobError("staged bundle: metadata.json is not a JSON object")
            meta_file.write_text(json.dumps({**metadata, "owner": owner, "run_id": run_id}))
            version = ModelRegistry(storage).register(name, local, owner=owner)
    except (RegistryError, RayJobError, ValueError, OSError) as error:
        return runs.update(
            run_id,
            state=RunState.FAILED,
            message=f"the staged model bundle was refused: {error}",
            finished=now_iso(),
        )
    finally:
        storage.delete(*claim)
    return runs.update(
        run_id,
        state=RunState.SUCCEEDED,
        stage="done",
        model={"name": version.name, "version": version.version},
        finished=now_iso(),
    )


def pipeline_jobs(settings: Settings) -> PipelineJobs:
    """The job backend ``settings.job_backend`` names: Ray Jobs, or one RayJob per run."""
    if settings.job_backend == "rayjob":
        return RayJobBackend(settings)
    return PipelineJobs(settings.jobs_url)
