"""``mlaas4hep run`` as a user runs it: a run that cannot go on says why in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlaas4hep.cli.quickstart import write_demo_inputs

pytestmark = pytest.mark.ray


def test_run_whose_training_cannot_fit_says_why_in_one_line_and_exits_1(
    ray_cluster, tmp_path: Path
) -> None:
    spec = write_demo_inputs(tmp_path / "demo", events=50, epochs=1)
    spec.write_text(spec.read_text().replace("num_workers: 2", "num_workers: 64"))
    # The session's MLAAS4HEP_HOME makes the command join the session's head.
    done = subprocess.run(
        [sys.executable, "-m", "mlaas4hep", "run", str(spec)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: run run-") and "failed: ResourceError: training asks for 64" in last
    )
    assert "Traceback" not in done.stdout + done.stderr
