"""Import order of native libraries that crash when loaded the wrong way round."""

from __future__ import annotations

import subprocess
import sys


def test_tensorflow_then_xrootd_does_not_crash_once_mlaas4hep_is_imported():
    code = "import mlaas4hep, tensorflow; from XRootD import client; print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
