"""Native libraries that crash when loaded the wrong way round are loaded the right way."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_xrootd_client_loaded_first_survives_tensorflow():
    done = _python(
        "from mlaas4hep.data.rootio import load_xrootd_client; load_xrootd_client(); "
        "import tensorflow; from XRootD import client; print('ok')"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_xrootd_after_tensorflow_is_refused_with_a_message_not_a_crash():
    done = _python(
        "import tensorflow\n"
        "from mlaas4hep.data.errors import DataError\n"
        "from mlaas4hep.data.rootio import load_xrootd_client\n"
        "try:\n    load_xrootd_client()\nexcept DataError as error:\n    print(error)\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before TensorFlow" in done.stdout


@pytest.mark.parametrize("module", ["mlaas4hep.train.trainer", "mlaas4hep.cli.main"])
def test_platform_modules_import_in_a_process_that_loaded_tensorflow(module):
    # Ray Train's workers load TensorFlow before they unpickle the platform's code.
    done = _python(f"import tensorflow, {module}; print('ok')")
    assert done.returncode == 0, done.stderr[-2000:]
