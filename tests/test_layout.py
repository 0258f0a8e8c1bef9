"""The package's imports point one way: each package imports only those below it, and no
module imports itself back through others (docs/architecture.md has the same map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlaas4hep"

#: The foundation every package may use: the pipeline spec, the settings, the version.
BASE = {"spec", "settings", "mlaas4hep"}

#: What each part of the package may import (besides itself and BASE). ``serve.apps``
#: (the Serve applications) is an entry point; the rest of ``serve`` is the inference
#: runtime, data plane and protocols, and knows nothing of pipelines.
MAY_IMPORT: dict[str, set[str]] = {
    "__main__": {"cli"},
    "cli": {
        "platform",
        "serve.apps",
        "serve",
        "pipeline",
        "train",
        "bundle",
        "data",
        "modelfiles",
        "store",
        "auth",
    },
    "platform": {"serve.apps", "auth"},
    "serve.apps": {"serve", "pipeline", "train", "bundle", "data", "modelfiles", "store", "auth"},
    "pipeline": {"train", "bundle", "data", "modelfiles", "store", "auth"},
    "serve": {"bundle", "data", "modelfiles", "store", "auth"},
    "train": {"bundle", "data", "modelfiles", "store", "auth"},
    "bundle": {"data", "modelfiles", "store"},
    "data": {"store"},
    "modelfiles": set(),
    "store": set(),
    "auth": set(),
    "spec": set(),
    "settings": set(),
    "mlaas4hep": set(),
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``<root>/serve/apps/inference.py`` -> ``mlaas4hep.serve.apps.inference``."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The key of MAY_IMPORT that ``module`` belongs to."""
    parts = module.split(".")[1:]
    if not parts:
        return "mlaas4hep"
    if parts[0] == "serve" and len(parts) > 1 and parts[1] == "apps":
        return "serve.apps"
    return parts[0]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the file at ``path`` imports (anywhere in it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from package import module`` names the module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package under ``root`` -> the package's modules it imports."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a imports b`` for every import that MAY_IMPORT does not allow."""
    bad = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        allowed = MAY_IMPORT[part] | BASE | {part}
        for target in sorted(targets):
            if part_of(target) not in allowed:
                bad.append(f"{module} imports {target}")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected parts of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_package_of_the_map():
    unknown = sorted(m for m in import_graph() if part_of(m) not in MAY_IMPORT)
    assert unknown == [], "add these to MAY_IMPORT and docs/architecture.md"


def test_no_module_imports_a_package_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_module_imports_itself_back_through_others():
    assert circles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    root = tmp_path / "mlaas4hep"
    for name, text in {
        "__init__.py": "",
        "store/__init__.py": "",
        "store/runs.py": "from mlaas4hep.pipeline import jobs\n",
        "pipeline/__init__.py": "",
        "pipeline/jobs.py": "import mlaas4hep.store.runs\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert upward_imports(graph) == ["mlaas4hep.store.runs imports mlaas4hep.pipeline.jobs"]
    assert circles(graph) == [["mlaas4hep.pipeline.jobs", "mlaas4hep.store.runs"]]


@pytest.mark.parametrize("package", sorted(p for p in MAY_IMPORT if p not in {"__main__"}))
def test_each_package_says_what_lives_there(package):
    if package in {"spec", "settings", "bundle", "mlaas4hep"}:
        path = PACKAGE / "__init__.py" if package == "mlaas4hep" else PACKAGE / f"{package}.py"
    else:
        path = PACKAGE.joinpath(*package.split(".")) / "__init__.py"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: no docstring"
