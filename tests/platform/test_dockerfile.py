"""The Dockerfile, read as text (no container engine here): base image, user, build tools."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import yaml
from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
BUILD_TOOLS = {"build-essential", "gcc", "g++", "cpp", "clang", "cmake", "make", "cc"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined)."""
    logical = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args, stages


def apt_installed(run: str) -> set[str]:
    """Packages named by the ``apt-get install`` commands of a RUN line."""
    packages: set[str] = set()
    for command in re.split(r"&&|;", run):
        words = command.split()
        if "apt-get" in words and "install" in words:
            start = words.index("install") + 1
            packages |= {w for w in words[start:] if not w.startswith("-")}
    return packages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _ray_pin() -> str:
    pyproject = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', pyproject).group(1)


def test_final_image_is_the_official_ray_image_of_the_pinned_version(dockerfile) -> None:
    args, stages = dockerfile
    assert stages[-1].base == "rayproject/ray:${RAY_IMAGE_TAG}"
    assert args["RAY_IMAGE_TAG"] == f"{_ray_pin()}-py311-cpu"
    assert f"RAY_IMAGE_TAG={_ray_pin()}-py311-gpu" in DOCKERFILE.read_text()


def test_final_image_runs_as_the_unprivileged_ray_user(dockerfile) -> None:
    final = dockerfile[1][-1]
    user = final.all("USER")[-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert [kw for kw, _ in final.instructions].index("CMD") > max(
        i for i, (kw, _) in enumerate(final.instructions) if kw == "USER"
    )


def test_final_image_installs_no_build_tools_and_removes_the_base_images(dockerfile) -> None:
    final = dockerfile[1][-1]
    runs = final.all("RUN")
    installed = set().union(*(apt_installed(run) for run in runs))
    assert "xrootd-client" in installed
    assert "bubblewrap" in installed  # the sandbox of every user model.py
    assert not installed & BUILD_TOOLS
    assert any("apt-get purge" in run and "gcc" in run for run in runs)
    pip = [run for run in runs if "pip install" in run]
    assert pip and all("--no-index" in run for run in pip), "only prebuilt wheels, no compiling"


def test_build_tools_stay_in_the_wheel_stage(dockerfile) -> None:
    _, stages = dockerfile
    wheels = next(s for s in stages if s.name == "wheels")
    assert "build-essential" in set().union(*(apt_installed(r) for r in wheels.all("RUN")))
    final = stages[-1]
    copies = final.all("COPY")
    assert copies == ["--from=wheels /wheels /tmp/wheels"]


def test_images_run_as_the_users_the_manifests_expect(dockerfile) -> None:
    stages = {s.name: s for s in dockerfile[1]}
    ray_uid = int(stages["platform"].all("USER")[-1].split(":")[0])
    xcache_uid = int(stages["xcache"].all("USER")[-1].split(":")[0])
    rayservice = yaml.safe_load((REPO / "k8s" / "base" / "rayservice.yaml").read_text())
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]
    assert {t["spec"]["securityContext"]["runAsUser"] for t in templates} == {ray_uid}
    xcache = next(
        yaml.safe_load_all((REPO / "k8s" / "base" / "xcache" / "xcache.yaml").read_text())
    )
    assert xcache["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == xcache_uid


def test_parser_sees_a_compiler_installed_in_the_final_stage() -> None:
    text = (
        "FROM a AS b\nFROM c\nRUN apt-get update && apt-get install -y \\\n"
        "    --no-install-recommends gcc xrootd-client\nUSER 1000\n"
    )
    _, stages = parse_dockerfile(text)
    assert apt_installed(stages[-1].all("RUN")[0]) == {"gcc", "xrootd-client"}
