"""Work that test_state_consistency runs in separate processes, against one storage folder.

Kept apart from the test module so that a spawned process imports only the platform's
storage code (not pytest's conftest). Each function starts when ``barrier`` lets every
process go at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlaas4hep.store.registry import ModelNameTaken, ModelRegistry
from mlaas4hep.store.runs import RunStore
from mlaas4hep.store.storage import Storage

#: Size of the payload file of a test bundle: big enough that copies take a while.
PAYLOAD_BYTES = 200_000


def write_test_bundle(folder: Path, name: str, writer: str) -> Path:
    """A bundle folder whose files name the ``writer`` that made it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({"name": name, "writer": writer}))
    (folder / "metadata.json").write_text(json.dumps({"owner": writer}))
    (folder / "saved_model").mkdir(exist_ok=True)
    (folder / "saved_model" / "payload.bin").write_bytes(writer.encode() * PAYLOAD_BYTES)
    return folder


def register(root: str, name: str, bundle: str, owner: str, out: Any, barrier: Any) -> None:
    """Register ``bundle`` as ``name`` for ``owner``; put the version (or the refusal) in
    ``out``."""
    registry = ModelRegistry(Storage(root))
    barrier.wait()
    try:
        out.put((owner, registry.register(name, bundle, owner).version))
    except ModelNameTaken:
        out.put((owner, "taken"))


def progress_updates(root: str, run_ids: list[str], rounds: int, barrier: Any) -> None:
    """What a pipeline does while it trains: one progress update of each run per round."""
    runs = RunStore(Storage(root))
    barrier.wait()
    for step in range(rounds):
        for run_id in run_ids:
            runs.update(run_id, progress={"epoch": step})


def metric_updates(root: str, run_id: str, writer: str, count: int, barrier: Any) -> None:
    """``count`` updates of the run, each adding one metric of its own."""
    runs = RunStore(Storage(root))
    barrier.wait()
    for index in range(count):
        runs.update(run_id, metrics={f"{writer}-{index}": index})
