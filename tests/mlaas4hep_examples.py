"""MLaaS4HEP's own example inputs (tests/inputs/mlaas4hep, see its README) for the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).parent / "inputs" / "mlaas4hep"
#: The shared data's one file with MLaaS4HEP's tree name (``Events``), as its examples read.
NANOAOD = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def mlaas4hep_example(tmp_path: Path, name: str, files: list[str] | None = None) -> Path:
    """A copy of the example folder ``name`` with its params.json unchanged; ``files``
    replaces its files.txt and labels.txt (labels 1, 0, 1, ...) when given."""
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    if files is not None:
        (folder / "files.txt").write_text("".join(f"{f}\n" for f in files))
        (folder / "labels.txt").write_text("".join(f"{1 - i % 2}\n" for i in range(len(files))))
    return folder
