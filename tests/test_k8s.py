"""The Kubernetes manifests: the Serve config they embed, and ``make k8s-validate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from mlaas4hep.cli import main
from mlaas4hep.platform.k8s import (
    ManifestError,
    build_overlay,
    embed_serve_config,
    import_path_problem,
    manifest_serve_config,
    serve_config_yaml,
)
from mlaas4hep.platform.k8s import main as validate_main
from mlaas4hep.platform.settings import load_settings
from mlaas4hep.serve.apps import serve_config

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
    assert import_path_problem("mlaas4hep.serve.tfaas:build_tfaas_app") is None
    assert "defines no 'build_nothing'" in import_path_problem(
        "mlaas4hep.serve.tfaas:build_nothing"
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
    assert "mlaas4hep.serve.tfaas defines no 'build_tfaas_ap'" in problems
    assert "Deployment/xcache: spec.replicas: 'one' is not of type 'integer'" in problems


def test_overlay_that_does_not_build_is_reported_with_kustomize_message(tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "base" / "storage.yaml").unlink()
    with pytest.raises(ManifestError, match=r"dev: kustomize failed: .*storage\.yaml"):
        build_overlay(tree / "overlays" / "dev")


@pytest.mark.ray
def test_autoscaling_cluster_leaves_gpu_training_to_the_autoscaler(ray_cluster, monkeypatch):
    from mlaas4hep.platform.config import ResourcesSpec
    from mlaas4hep.train.trainer import AUTOSCALING_ENV, ResourceError, check_resources

    gpus = ResourcesSpec(num_workers=2, use_gpu=True)
    with pytest.raises(ResourceError, match="GPU 2 asked, 0 exist"):
        check_resources(gpus)
    monkeypatch.setenv(AUTOSCALING_ENV, "true")
    check_resources(gpus)  # the GPU group starts from zero nodes on KubeRay
