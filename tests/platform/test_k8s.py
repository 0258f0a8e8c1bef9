"""The Kubernetes manifests: the Serve config they embed, and ``make k8s-validate``."""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from mlaas4hep.auth.oidc import Principal
from mlaas4hep.cli.main import main
from mlaas4hep.pipeline.jobs import PipelineJobs
from mlaas4hep.pipeline.rayjob import (
    KubernetesApi,
    RayJobBackend,
    RayJobError,
    pipeline_jobs,
    register_staged_bundle,
    render_rayjob,
)
from mlaas4hep.platform.k8s import (
    ManifestError,
    build_overlay,
    crd_schemas,
    embed_serve_config,
    import_path_problem,
    manifest_serve_config,
    serve_config_yaml,
    validate_object,
)
from mlaas4hep.platform.k8s import main as validate_main
from mlaas4hep.serve.apps.context import ApiContext
from mlaas4hep.serve.apps.deploy import serve_config
from mlaas4hep.serve.apps.pipeline_api import _record
from mlaas4hep.settings import Settings, load_settings
from mlaas4hep.spec import ResourcesSpec
from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunStore
from mlaas4hep.store.storage import Storage

K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
RAYSERVICE = K8S / "base" / "rayservice.yaml"


@pytest.fixture(scope="module")
def crds() -> Path:
    if not CRDS.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {CRDS}: clone beside ../shared")
    return CRDS


def test_committed_rayservice_serve_config_matches_the_apps() -> None:
    expected = json.loads(json.dumps(serve_config(load_settings(), kubernetes=True)))
    assert manifest_serve_config(RAYSERVICE) == expected, (
        "k8s/base/rayservice.yaml is stale: run "
        "'mlaas4hep serve-config --kubernetes --manifest k8s/base/rayservice.yaml'"
    )


def test_cluster_serve_config_leaves_out_the_builtin_issuer_and_embedded_settings() -> None:
    config = serve_config(load_settings(), kubernetes=True)
    names = [app["name"] for app in config["applications"]]
    assert "issuer" not in names and {"api", "tfaas"} <= set(names)
    for app in config["applications"]:
        assert not {"storage", "oidc_issuer"} & set(app["args"])


def test_serve_config_command_prints_the_config(capsys) -> None:
    assert main(["serve-config", "--kubernetes"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(
        serve_config_yaml(load_settings(), kubernetes=True)
    )


def test_serve_config_command_rewrites_only_the_manifest_block(tmp_path: Path) -> None:
    manifest = tmp_path / "rayservice.yaml"
    original = RAYSERVICE.read_text()
    manifest.write_text(original.replace("max_replicas: 4", "max_replicas: 40"))
    assert main(["serve-config", "--kubernetes", "--manifest", str(manifest)]) == 0
    assert manifest.read_text() == original


def test_manifest_without_a_serve_config_block_is_refused_by_name(tmp_path: Path) -> None:
    manifest = tmp_path / "other.yaml"
    manifest.write_text("kind: ConfigMap\n")
    with pytest.raises(ManifestError, match=r"other\.yaml: no 'serveConfigV2: \|' block"):
        embed_serve_config(manifest, "applications: []\n")


def test_import_paths_are_checked_against_the_package() -> None:
    assert import_path_problem("mlaas4hep.serve.apps.inference:build_tfaas_app") is None
    assert "defines no 'build_nothing'" in import_path_problem(
        "mlaas4hep.serve.apps.inference:build_nothing"
    )
    assert "no module mlaas4hep.serve.gone" in import_path_problem("mlaas4hep.serve.gone:app")


def test_every_overlay_builds_and_validates(crds: Path, capsys) -> None:
    assert validate_main([str(K8S), str(crds)]) == 0
    out = capsys.readouterr().out
    assert "overlays [dev, gpu]: 0 problems" in out


def _break(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer holds {old!r}"
    path.write_text(text.replace(old, new, 1))


def test_broken_manifests_fail_validation_naming_object_and_field(
    crds: Path, tmp_path: Path, capsys
) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    rayservice = tree / "base" / "rayservice.yaml"
    _break(rayservice, "enableInTreeAutoscaling: true", "enableInTreeAutoscalling: true")
    _break(rayservice, "build_tfaas_app", "build_tfaas_ap")
    _break(tree / "base" / "xcache" / "xcache.yaml", "replicas: 1", "replicas: one")
    assert validate_main([str(tree), str(crds)]) == 1
    problems = capsys.readouterr().err
    assert "RayService/mlaas4hep: spec.rayClusterConfig" in problems
    assert "'enableInTreeAutoscalling' was unexpected" in problems
    assert "mlaas4hep.serve.apps.inference defines no 'build_tfaas_ap'" in problems
    assert "Deployment/xcache: spec.replicas: 'one' is not of type 'integer'" in problems


def test_overlay_that_does_not_build_is_reported_with_kustomize_message(tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "base" / "storage.yaml").unlink()
    with pytest.raises(ManifestError, match=r"dev: kustomize failed: .*storage\.yaml"):
        build_overlay(tree / "overlays" / "dev")


@pytest.mark.ray
def test_autoscaling_cluster_leaves_gpu_training_to_the_autoscaler(ray_cluster, monkeypatch):
    from mlaas4hep.spec import ResourcesSpec
    from mlaas4hep.train.trainer import AUTOSCALING_ENV, ResourceError, check_resources

    gpus = ResourcesSpec(num_workers=2, use_gpu=True)
    with pytest.raises(ResourceError, match="GPU 2 asked, 0 exist"):
        check_resources(gpus)
    monkeypatch.setenv(AUTOSCALING_ENV, "true")
    check_resources(gpus)  # the GPU group starts from zero nodes on KubeRay


# --------------------------------------------------------------------------- pipeline RayJobs

RUN_ID = "run-20261203-120000-abcdef"
MALLORY = Principal(sub="mallory", issuer="https://iam.example/")
OWNER = MALLORY.owner
OTHER_OWNER = Principal(sub="bob", issuer="https://iam.example/").owner
UID = "0b6f4c1e-2d3a-4b5c-8d9e-0f1a2b3c4d5e"
#: Platform secrets the settings of the API hold; none may reach a pipeline pod.
SECRETS = {"token": "cli-bearer-token-4711", "oidc_issuer": "https://iam.secret.example/"}


def rayjob_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "home": str(tmp_path / "home"),
        "storage": str(tmp_path / "data" / "mlaas4hep"),
        "rayjob_storage_mount": str(tmp_path / "data"),
        "rayjob_image": "registry.example.org/mlaas4hep/mlaas4hep:0.1.0",
        "kubernetes_namespace": "mlaas4hep",
        "job_backend": "rayjob",
        **SECRETS,
        **overrides,
    }
    return Settings.model_validate(values)


def _render(tmp_path: Path, resources: ResourcesSpec | None = None, **overrides) -> dict:
    return render_rayjob(
        rayjob_settings(tmp_path, **overrides),
        RUN_ID,
        OWNER,
        "higgs",
        resources or ResourcesSpec(num_workers=2),
        ("spec.json", "model.py"),
    )


def _pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"] for group in groups]


def _walk(node, path=""):
    """(path, key, value) of every mapping entry below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, f"{path}[{index}]")


def test_rendered_rayjob_is_valid_against_the_rayjob_crd(crds: Path, tmp_path: Path) -> None:
    gpu = ResourcesSpec(
        num_workers=2,
        use_gpu=True,
        cpus_per_worker=1.5,
        resources_per_worker={"fast_disk": 1},
        read_resources={"data_node": 0.01},
    )
    for resources, userns in ((ResourcesSpec(), False), (gpu, True)):
        rayjob = _render(tmp_path, resources, rayjob_pod_user_namespace=userns)
        assert list(validate_object(rayjob, crd_schemas(crds))) == []
        spec = rayjob["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == 86400
        assert spec["jobId"] == RUN_ID and spec["metadata"]["owner"] == OWNER
    worker = _render(tmp_path, gpu, rayjob_pod_user_namespace=True)["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ][0]
    assert worker["template"]["spec"]["hostUsers"] is False
    container = worker["template"]["spec"]["containers"][0]
    assert container["securityContext"]["procMount"] == "Unmasked"
    assert worker["replicas"] == worker["maxReplicas"] == 2
    assert worker["rayStartParams"]["num-gpus"] == "1"
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "2" and limits["nvidia.com/gpu"] == "1"


def test_broken_rayjob_fails_crd_validation_naming_the_field(crds: Path, tmp_path: Path) -> None:
    rayjob = _render(tmp_path)
    rayjob["spec"]["shutdownAfterJobFinish"] = rayjob["spec"].pop("shutdownAfterJobFinishes")
    problems = list(validate_object(rayjob, crd_schemas(crds)))
    assert any("'shutdownAfterJobFinish' was unexpected" in p for p in problems), problems


def test_rayjob_pods_hold_no_secret_no_api_token_and_no_platform_setting(tmp_path: Path) -> None:
    rayjob = _render(tmp_path)
    for path, key, value in _walk(rayjob):
        assert key not in {"secretRef", "secretKeyRef", "secret", "projected", "envFrom"}, path
        assert not any(s in str(value) for s in SECRETS.values()), f"{path}.{key}"
    assert "submitterPodTemplate" not in rayjob["spec"]  # HTTPMode: no submitter pod
    for template in _pod_specs(rayjob):
        pod = template["spec"]
        assert pod["serviceAccountName"] == "mlaas4hep-pipeline"
        assert pod["automountServiceAccountToken"] is False
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert set(env) == {
            "MLAAS4HEP_STORAGE",
            "MLAAS4HEP_HOME",
            "MLAAS4HEP_JOB_BACKEND",
            "TF_USE_LEGACY_KERAS",
        }
        assert env["MLAAS4HEP_JOB_BACKEND"] == "rayjob"
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_rayjob_sees_only_its_run_read_write_and_its_owners_uploads_read_only(
    tmp_path: Path,
) -> None:
    storage = str(tmp_path / "data" / "mlaas4hep")
    run = f"{storage}/runs/{RUN_ID}"
    for template in _pod_specs(_render(tmp_path)):
        mounts = {
            m["mountPath"]: (m["subPath"], m["readOnly"])
            for m in template["spec"]["containers"][0]["volumeMounts"]
            if m["name"] == "storage"
        }
        assert mounts == {
            run: (f"mlaas4hep/runs/{RUN_ID}", False),
            f"{run}/spec.json": (f"mlaas4hep/runs/{RUN_ID}/spec.json", True),
            f"{run}/model.py": (f"mlaas4hep/runs/{RUN_ID}/model.py", True),
            f"{storage}/uploads/{OWNER}": (f"mlaas4hep/uploads/{OWNER}", True),
        }


def test_rayjob_shows_shared_data_roots_read_only_and_passes_the_data_rules(
    tmp_path: Path,
) -> None:
    shared = str(tmp_path / "data" / "opendata")
    rules = {"shared_data_roots": [shared], "allowed_data_hosts": ["root://xcache:1094"]}
    for template in _pod_specs(_render(tmp_path, **rules, model_sandbox="bwrap")):
        container = template["spec"]["containers"][0]
        assert {
            "name": "storage",
            "mountPath": shared,
            "subPath": "opendata",
            "readOnly": True,
        } in (container["volumeMounts"])
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLAAS4HEP_SHARED_DATA_ROOTS"] == shared
        assert env["MLAAS4HEP_ALLOWED_DATA_HOSTS"] == "root://xcache:1094"


@pytest.mark.parametrize("root", ["{storage}", "{storage}/uploads/bob", "{mount}", "/srv/data"])
def test_shared_data_root_that_would_expose_the_platform_is_refused(tmp_path: Path, root: str):
    storage, mount = tmp_path / "data" / "mlaas4hep", tmp_path / "data"
    shared = root.format(storage=storage, mount=mount)
    with pytest.raises(RayJobError, match=re.escape(f"shared_data_roots: {shared!r} is not")):
        _render(tmp_path, shared_data_roots=[shared])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"owner": "../uploads/bob-abcdef0123"}, "owner '../uploads/bob-abcdef0123'"),
        ({"owner": f"{OWNER}\n"}, "owner"),
        ({"job_id": f"{RUN_ID}\n"}, "not a pipeline job id"),
        ({"job_id": "run-20261203-120000-abcdef/../x"}, "not a pipeline job id"),
        ({"model_name": "a b"}, "invalid model name 'a b'"),
        ({"rayjob_image": "evil image;rm"}, "rayjob_image 'evil image;rm'"),
        ({"kubernetes_namespace": "Mlaas4hep"}, "kubernetes_namespace 'Mlaas4hep'"),
        ({"rayjob_seccomp_profile": "Unconfined"}, "rayjob_seccomp_profile 'Unconfined'"),
        ({"storage": "s3://bucket/mlaas4hep"}, "object storage would need per-run credentials"),
        ({"storage": "/elsewhere/mlaas4hep"}, "is not below rayjob_storage_mount"),
        ({"resources": ResourcesSpec(read_resources={"CPU": 1})}, "custom resource 'CPU'"),
        ({"resources": ResourcesSpec(resources_per_worker={'x": 1, "GPU': 1})}, "custom resource"),
        ({"read_only_files": ("status.json",)}, "cannot be mounted read-only"),
    ],
)
def test_rayjob_refuses_values_outside_its_rules(tmp_path: Path, change: dict, message: str):
    args = {
        "job_id": RUN_ID,
        "owner": OWNER,
        "model_name": "higgs",
        "resources": ResourcesSpec(),
        "read_only_files": ("spec.json",),
    }
    settings_change = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(RayJobError, match=re.escape(message)):
        render_rayjob(rayjob_settings(tmp_path, **settings_change), **args)


def _objects(overlay: str) -> dict[tuple[str, str], dict]:
    return {
        (o["kind"], o["metadata"]["name"]): o for o in build_overlay(K8S / "overlays" / overlay)
    }


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, NotIn/In expressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present = labels.get(expression["key"]) in expression["values"]
        if present != (expression["operator"] == "In"):
            return False
    return True


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_overlays_fence_pipeline_pods_off_the_platform(overlay: str, tmp_path: Path) -> None:
    objects = _objects(overlay)
    pipeline_labels = _pod_specs(_render(tmp_path))[0]["metadata"]["labels"]
    pipeline_labels = {**pipeline_labels, "ray.io/is-ray-node": "yes"}  # KubeRay adds it
    isolation = objects[("NetworkPolicy", "pipeline-isolation")]["spec"]
    assert _selects(isolation["podSelector"], pipeline_labels)
    assert set(isolation["policyTypes"]) == {"Ingress", "Egress"}
    reachable = []
    for rule in isolation["egress"]:
        for peer in rule["to"]:
            assert "ipBlock" not in peer, "pipeline pods may not reach addresses outside"
            name = peer["podSelector"].get("matchLabels", {})
            ports = sorted(p["port"] for p in rule.get("ports", []))
            reachable.append((tuple(sorted(name.items())), ports))
    assert sorted(reachable) == [
        ((("app.kubernetes.io/name", "xcache"),), [1094]),
        ((("k8s-app", "kube-dns"),), [53, 53]),
        ((("mlaas4hep.io/role", "pipeline"),), []),
    ]
    assert all("podSelector" not in peer for rule in isolation["ingress"] for peer in rule["from"])
    # The RayService's pods admit no pipeline pod, and the policy does not select them.
    internal = objects[("NetworkPolicy", "ray-internal")]["spec"]
    assert not _selects(internal["podSelector"], pipeline_labels)
    assert not any(
        _selects(peer["podSelector"], pipeline_labels)
        for rule in internal["ingress"]
        for peer in rule["from"]
        if "podSelector" in peer
    )


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_overlays_give_the_api_rayjob_rights_only_and_pipelines_none(overlay: str) -> None:
    objects = _objects(overlay)
    assert (
        objects[("ServiceAccount", "mlaas4hep-pipeline")]["automountServiceAccountToken"] is False
    )
    rules = objects[("Role", "mlaas4hep-pipelines")]["rules"]
    assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in rules] == [
        (["ray.io"], ["rayjobs"], ["create", "delete", "get"]),
        (["networking.k8s.io"], ["networkpolicies"], ["create"]),
    ]
    binding = objects[("RoleBinding", "mlaas4hep-api-pipelines")]
    namespace = binding["metadata"]["namespace"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mlaas4hep-api", "namespace": namespace}
    ]
    bound = [o for o in objects.values() if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
    assert not any(s["name"] == "mlaas4hep-pipeline" for b in bound for s in b["subjects"])
    service = objects[("RayService", "mlaas4hep")]["spec"]["rayClusterConfig"]
    head = service["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "mlaas4hep-api"
    settings = objects[("ConfigMap", "mlaas4hep-settings")]["data"]
    assert settings["MLAAS4HEP_JOB_BACKEND"] == "rayjob"
    assert settings["MLAAS4HEP_RAYJOB_IMAGE"] == head["containers"][0]["image"]
    gpu = next(g for g in service["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert (
        settings["MLAAS4HEP_RAYJOB_GPU_IMAGE"] == gpu["template"]["spec"]["containers"][0]["image"]
    )
    volume = next(v for v in head["volumes"] if v["name"] == "storage")
    assert (
        settings["MLAAS4HEP_RAYJOB_STORAGE_CLAIM"] == volume["persistentVolumeClaim"]["claimName"]
    )
    assert settings["MLAAS4HEP_STORAGE"].startswith(
        settings["MLAAS4HEP_RAYJOB_STORAGE_MOUNT"] + "/"
    )


class FakeKubernetesApi:
    """A loopback HTTP server answering like the API server, recording each request.

    ``answers`` maps (method, path without query) to (status, JSON body). Only the shape
    of the requests is tested here: nothing of this has run against a real API server.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: dict[tuple[str, str], tuple[int, dict]] = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path, _, query = self.path.partition("?")
                fake.requests.append(
                    {
                        "method": self.command,
                        "path": path,
                        "query": query,
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                status, answer = fake.answers.get((self.command, path), (404, {"message": "no"}))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


RAYJOBS = "/apis/ray.io/v1/namespaces/mlaas4hep/rayjobs"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/mlaas4hep/networkpolicies"


@pytest.fixture
def kube(tmp_path: Path):
    fake = FakeKubernetesApi()
    yield fake
    fake.stop()


@pytest.fixture
def backend(kube: FakeKubernetesApi, tmp_path: Path) -> RayJobBackend:
    """The rayjob backend on a fresh storage folder holding one submitted run's spec."""
    settings = rayjob_settings(tmp_path, kubernetes_api_url=kube.url)
    token = tmp_path / "sa-token"
    token.write_text("api-service-account-token\n")
    storage = Storage(settings.storage)
    spec = {"name": "higgs", "resources": {"num_workers": 3}}
    storage.write_text(json.dumps(spec), "runs", RUN_ID, "spec.json")
    RunStore(storage).create(RUN_ID, owner=OWNER, name="higgs", job_id=RUN_ID)
    api = KubernetesApi(kube.url, token_file=token, ca_file=tmp_path / "no-ca.crt")
    return RayJobBackend(settings, api=api)


def test_rayjob_backend_creates_the_rayjob_and_its_run_policy_with_the_api_token(
    kube: FakeKubernetesApi, backend: RayJobBackend, crds: Path
) -> None:
    name = f"mlaas4hep-{RUN_ID}"
    kube.answers[("POST", RAYJOBS)] = (201, {"metadata": {"name": name, "uid": UID}})
    kube.answers[("POST", POLICIES)] = (201, {})
    assert backend.submit(RUN_ID, OWNER, "ignored") == RUN_ID
    created, policy = kube.requests
    assert {r["auth"] for r in kube.requests} == {"Bearer api-service-account-token"}
    assert created["method"] == "POST" and created["path"] == RAYJOBS
    assert created["body"] == backend.render(RUN_ID, OWNER)
    assert created["body"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert policy["path"] == POLICIES
    assert list(validate_object(policy["body"], crd_schemas(crds))) == []  # Kubernetes 1.32
    owner_ref = policy["body"]["metadata"]["ownerReferences"][0]
    assert owner_ref == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": UID}
    run_pods = {"mlaas4hep.io/role": "pipeline", "mlaas4hep.io/run-id": RUN_ID}
    assert policy["body"]["spec"]["podSelector"]["matchLabels"] == run_pods
    assert policy["body"]["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": run_pods}}]}
    ]


def test_resume_under_an_owner_the_run_was_not_submitted_by_is_refused(
    kube: FakeKubernetesApi, backend: RayJobBackend
) -> None:
    name = f"mlaas4hep-{RUN_ID}"
    kube.answers[("POST", RAYJOBS)] = (201, {"metadata": {"name": name, "uid": UID}})
    kube.answers[("POST", POLICIES)] = (201, {})
    backend.submit(RUN_ID, OWNER, "ignored")
    mounts = backend.render(RUN_ID, OWNER)["spec"]["rayClusterSpec"]["headGroupSpec"]
    mounted = mounts["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"].endswith("/submission.json") and m["readOnly"] for m in mounted)
    # The first job rewrote status.json to name bob: resuming it as bob's is refused.
    RunStore(backend.storage).update(RUN_ID, owner=OTHER_OWNER)
    sent = len(kube.requests)
    with pytest.raises(RayJobError, match="it was submitted by 'mallory-"):
        backend.submit(RUN_ID, OTHER_OWNER, "ignored", job_id=f"{RUN_ID}-r1")
    assert len(kube.requests) == sent  # nothing was created
    assert backend.submit(RUN_ID, OWNER, "ignored", job_id=f"{RUN_ID}-r1") == f"{RUN_ID}-r1"


def test_rayjob_whose_run_policy_is_refused_is_deleted_again(
    kube: FakeKubernetesApi, backend: RayJobBackend
) -> None:
    name = f"mlaas4hep-{RUN_ID}"
    kube.answers[("POST", RAYJOBS)] = (201, {"metadata": {"name": name, "uid": UID}})
    kube.answers[("POST", POLICIES)] = (403, {"message": "networkpolicies is forbidden"})
    kube.answers[("DELETE", f"{RAYJOBS}/{name}")] = (200, {})
    with pytest.raises(RayJobError, match=r"NetworkPolicy .* answered 403: networkpolicies is"):
        backend.submit(RUN_ID, OWNER, "ignored")
    assert [(r["method"], r["path"]) for r in kube.requests][-1] == ("DELETE", f"{RAYJOBS}/{name}")


def test_rayjob_backend_maps_rayjob_status_and_forgets_deleted_ones(
    kube: FakeKubernetesApi, backend: RayJobBackend
) -> None:
    path = f"{RAYJOBS}/mlaas4hep-{RUN_ID}"
    metadata = {
        "annotations": {"mlaas4hep.io/owner": OWNER, "mlaas4hep.io/model": "higgs"},
        "labels": {"mlaas4hep.io/run-id": RUN_ID},
    }
    for status, state in [
        ({}, "PENDING"),
        ({"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, "RUNNING"),
        ({"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}, "SUCCEEDED"),
        ({"jobStatus": "STOPPED"}, "CANCELLED"),
        ({"jobDeploymentStatus": "Failed", "message": "image pull failed"}, "FAILED"),
    ]:
        kube.answers[("GET", path)] = (200, {"metadata": metadata, "status": status})
        view = backend.view(RUN_ID)
        assert view.state == state
        assert view.metadata["owner"] == OWNER and view.metadata["run_id"] == RUN_ID
    assert view.message == "image pull failed"
    kube.answers[("DELETE", path)] = (200, {})
    assert backend.stop(RUN_ID) is True
    assert kube.requests[-1]["query"] == "propagationPolicy=Background"
    del kube.answers[("GET", path)], kube.answers[("DELETE", path)]
    assert backend.view(RUN_ID) is None
    assert backend.stop(RUN_ID) is False
    assert backend.logs(RUN_ID) == ""  # the run's log is read from storage


def test_job_backend_setting_picks_one_rayjob_per_pipeline(tmp_path: Path) -> None:
    assert isinstance(pipeline_jobs(rayjob_settings(tmp_path)), RayJobBackend)
    laptop = pipeline_jobs(rayjob_settings(tmp_path, job_backend="ray-jobs"))
    assert isinstance(laptop, PipelineJobs)
    with pytest.raises(ValueError, match="job_backend"):
        rayjob_settings(tmp_path, job_backend="docker")


def _stage_bundle(storage: Storage, claimed_owner: str = OTHER_OWNER) -> Path:
    """A bundle as a tenant's job leaves it in its run folder (metadata claiming anyone)."""
    bundle = Path(storage.path("runs", RUN_ID, "bundle"))
    bundle.mkdir(parents=True)
    (bundle / "params.json").write_text(json.dumps({"name": "higgs"}))
    (bundle / "metadata.json").write_text(json.dumps({"owner": claimed_owner, "run_id": "x"}))
    return bundle


def _succeeded(backend: RayJobBackend, kube: FakeKubernetesApi, run_id: str = RUN_ID, owner=OWNER):
    labels = {"mlaas4hep.io/run-id": run_id}
    annotations = {"mlaas4hep.io/owner": owner, "mlaas4hep.io/model": "higgs"}
    body = {"metadata": {"labels": labels, "annotations": annotations}}
    body["status"] = {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
    kube.answers[("GET", f"{RAYJOBS}/mlaas4hep-{run_id}")] = (200, body)


def test_api_registers_a_staged_bundle_under_the_rayjobs_owner_once(
    kube: FakeKubernetesApi, backend: RayJobBackend
) -> None:
    storage = backend.storage
    _stage_bundle(storage)
    _succeeded(backend, kube)
    ctx = dataclasses.replace(ApiContext.from_settings(backend.settings), jobs=backend)
    record = _record(ctx, RUN_ID, MALLORY)
    assert record["state"] == "SUCCEEDED", record
    assert record["model"] == {"name": "higgs", "version": 1}
    registered = ModelRegistry(storage).record("higgs")
    assert registered.owner == OWNER
    assert storage.read_json("models", "higgs", "1", "metadata.json")["owner"] == OWNER
    assert not storage.exists("runs", RUN_ID, "bundle")
    # Seen again (another replica, a later poll): nothing more is registered.
    assert register_staged_bundle(storage, RunStore(storage), RUN_ID, backend.view(RUN_ID)) is None
    assert ModelRegistry(storage).versions("higgs") == [1]


def test_staged_bundle_with_a_symlink_is_refused_and_registers_nothing(
    kube: FakeKubernetesApi, backend: RayJobBackend, tmp_path: Path
) -> None:
    secret = tmp_path / "home" / "issuer-key.jwks"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("PRIVATE KEY")
    (_stage_bundle(backend.storage) / "labels.txt").symlink_to(secret)
    _succeeded(backend, kube)
    record = register_staged_bundle(
        backend.storage, RunStore(backend.storage), RUN_ID, backend.view(RUN_ID)
    )
    assert record["state"] == "FAILED"
    assert "labels.txt is not a regular file or folder" in record["message"]
    assert not backend.storage.exists("models", "higgs")


def test_run_naming_another_runs_job_cannot_register_under_its_owner(
    kube: FakeKubernetesApi, backend: RayJobBackend
) -> None:
    # The run's folder is writable by its job: status.json may name bob's RayJob.
    bobs_run = "run-20261203-110000-bbbbbb"
    _stage_bundle(backend.storage)
    _succeeded(backend, kube, run_id=bobs_run, owner=OTHER_OWNER)
    bobs_view = backend.view(bobs_run)
    assert (
        register_staged_bundle(backend.storage, RunStore(backend.storage), RUN_ID, bobs_view)
        is None
    )
    assert not backend.storage.exists("models", "higgs")


MODEL_PY = """\
from tensorflow import keras

def model(idim):
    net = keras.Sequential([keras.layers.Dense(4, activation="relu", input_shape=(idim,)),
                            keras.layers.Dense(1, activation="sigmoid")])
    net.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return net
"""


@pytest.mark.ray
def test_pipeline_in_a_rayjob_stages_its_bundle_and_the_api_registers_it(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    from mlaas4hep.cli.demo import write_demo_data
    from mlaas4hep.pipeline.jobs import JobView
    from mlaas4hep.pipeline.orchestrator import run_pipeline
    from mlaas4hep.spec import parse_spec
    from mlaas4hep.store.runs import new_run_id

    signal, background = write_demo_data(tmp_path / "data", events=200, seed=5)
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_PY)
    spec = parse_spec(
        {
            "name": "staged",
            "files": [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}],
            "epochs": 1,
            "model": str(model_file),
            "resources": {"num_workers": 1},
        }
    )
    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    monkeypatch.setenv("MLAAS4HEP_JOB_BACKEND", "rayjob")  # as in a RayJob's pods
    record = run_pipeline(spec, run_id, OWNER, storage)

    # The job wrote only into its run folder: models/ is the API's to write.
    assert record["state"] == "RUNNING" and record["stage"] == "bundle staged", record
    assert not storage.exists("models")
    assert storage.exists("runs", run_id, "bundle", "params.json")
    job = JobView(run_id, "SUCCEEDED", "", {"owner": OWNER, "model": "staged", "run_id": run_id})
    record = register_staged_bundle(storage, RunStore(storage), run_id, job)
    assert record["state"] == "SUCCEEDED" and record["model"] == {"name": "staged", "version": 1}
    assert record["metrics"], "the job's test metrics stay in the record"
    version = ModelRegistry(storage).get("staged")
    assert ModelRegistry(storage).record("staged").owner == OWNER
    assert (Path(version.path) / "model.keras").is_file()


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_kserve_grpc_service_reaches_every_pod_that_runs_serve_replicas(overlay: str) -> None:
    objects = _objects(overlay)
    settings = objects[("ConfigMap", "mlaas4hep-settings")]["data"]
    port = int(settings["MLAAS4HEP_GRPC_PORT"])
    assert settings["MLAAS4HEP_GRPC_HOST"] == "0.0.0.0"
    service = objects[("Service", "mlaas4hep-grpc")]["spec"]
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(port, "grpc")]
    cluster = objects[("RayService", "mlaas4hep")]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        if group["rayStartParams"].get("num-cpus") == "0":
            continue  # runs no Serve replica
        template = group["template"]
        labels = template.get("metadata", {}).get("labels", {})
        assert service["selector"].items() <= labels.items(), group.get("groupName", "head")
        ports = template["spec"]["containers"][0]["ports"]
        assert {"name": "grpc", "containerPort": port} in ports
    ingress = objects[("Ingress", "mlaas4hep-grpc")]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == (
        "GRPC"
    )
    policy = objects[("NetworkPolicy", "ray-internal")]["spec"]["ingress"]
    assert any({"protocol": "TCP", "port": port} in rule.get("ports", []) for rule in policy)
