"""A real XRootD server on loopback serving a temporary folder (``run_xrootd``).

Use it from a module-scoped fixture::

    @pytest.fixture(scope="module")
    def xrootd_server():
        with run_xrootd() as server:
            yield server
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

XROOTD = shutil.which("xrootd")


@dataclass
class XRootDServer:
    """``url`` is the root:// prefix of ``folder`` (``url + "/name.root"``)."""

    url: str
    folder: Path

    def add(self, source: Path, name: str | None = None) -> str:
        """Copy ``source`` into the served folder; return its root:// URL."""
        target = self.folder / (name or source.name)
        shutil.copy(source, target)
        target.chmod(0o644)
        return f"{self.url}/{target.name}"


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"xrootd exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"xrootd did not listen on port {port} within {timeout:g} s")


@contextmanager
def run_xrootd() -> Iterator[XRootDServer]:
    """Start Debian's ``xrootd`` on a free loopback port; stop it and remove its files after."""
    if XROOTD is None:
        pytest.skip("xrootd is not installed")
    base = Path(tempfile.mkdtemp(prefix="mlaas4hep-xrootd-"))
    base.chmod(0o777)  # the server runs as the xrootd user when started by root
    folder = base / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    port = free_port()
    config = base / "xrootd.cfg"
    config.write_text(
        f"all.export /\noss.localroot {folder}\nall.adminpath {base}/admin\n"
        "xrd.allow host localhost\n"
    )
    command = [XROOTD, "-p", str(port), "-c", str(config), "-l", str(base / "xrootd.log")]
    if os.geteuid() == 0:
        command[1:1] = ["-R", "xrootd"]  # xrootd refuses to run as root
    process = subprocess.Popen(
        command, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(port, process)
        yield XRootDServer(f"root://127.0.0.1:{port}/", folder)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)
