"""The API reference in docs/ matches the code."""

from __future__ import annotations

import json

from conftest import REPO

from mlaas4hep.cli.main import openapi_documents
from mlaas4hep.settings import load_settings


def test_committed_openapi_documents_match_the_apps():
    for name, document in openapi_documents(load_settings()).items():
        committed = json.loads((REPO / "docs" / "openapi" / name).read_text())
        assert committed == json.loads(json.dumps(document)), (
            f"docs/openapi/{name} is stale: run 'mlaas4hep openapi'"
        )


def test_readme_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block
    assert "make test" in first_block
    assert "make test" in (REPO / ".ci" / "run").read_text()
