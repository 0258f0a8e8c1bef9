"""Helpers shared by the data-layer tests: specs of one file, damaged copies of a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import uproot

from mlaas4hep.spec import PipelineSpec, parse_spec


def one_file_spec(path: str | Path, tree: str, label: int = 1, **extra: Any) -> PipelineSpec:
    """A spec reading TTree ``tree`` of one file, every event labelled ``label``."""
    return parse_spec({"files": [{"path": str(path), "label": label}], "branch": tree, **extra})


def damaged_copy(source: Path, tree: str, branch: str, target: Path) -> Path:
    """Copy ``source`` to ``target`` with 300 bytes of ``branch``'s first basket zeroed."""
    seek = int(uproot.open(source)[tree][branch].member("fBasketSeek")[0])
    data = bytearray(source.read_bytes())
    data[seek + 100 : seek + 400] = bytes(300)
    target.write_bytes(bytes(data))
    return target
