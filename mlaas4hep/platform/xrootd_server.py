"""A local XRootD server on loopback serving a temporary folder, for tests and benchmarks.

Uses Debian's ``xrootd`` (package ``xrootd-server``), which refuses to run as root:
started by root, it runs as the ``xrootd`` user (``-R xrootd``)::

    with run_xrootd() as server:
        url = server.add(Path("events.root"))   # root://127.0.0.1:PORT//events.root
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

from mlaas4hep.platform.cluster import free_port

XROOTD = shutil.which("xrootd")


class XRootDNotInstalled(RuntimeError):
    """The ``xrootd`` executable is not on PATH."""


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


def server_folder(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o777)  # the server runs as the xrootd user when started by root
    return base


@contextmanager
def serve(
    config: str | Path, base: Path, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[int]:
    """Run ``xrootd -c config`` on ``port`` (default: a free one), yielded, logging into ``base``.

    ``env`` is added to the server's environment (``set x = $VAR`` in configs). The
    server is stopped and ``base`` removed on exit.
    """
    if XROOTD is None:
        raise XRootDNotInstalled("xrootd is not installed (Debian package xrootd-server)")
    port = port or free_port()
    command = [XROOTD, "-p", str(port), "-c", str(config), "-l", str(base / "xrootd.log")]
    if os.geteuid() == 0:
        command[1:1] = ["-R", "xrootd"]  # xrootd refuses to run as root
    process = subprocess.Popen(
        command,
        cwd=base,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def run_xrootd(port: int | None = None) -> Iterator[XRootDServer]:
    """Start ``xrootd`` serving a new temporary folder on ``port`` (default: a free one);
    stop it and remove its files after.

    Raises :class:`XRootDNotInstalled` when there is no ``xrootd`` executable.
    """
    base = server_folder("mlaas4hep-xrootd-")
    folder = base / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    config = base / "xrootd.cfg"
    config.write_text(
        f"all.export /\noss.localroot {folder}\nall.adminpath {base}/admin\n"
        "xrd.allow host localhost\n"
    )
    with serve(config, base, port=port) as bound:
        yield XRootDServer(f"root://127.0.0.1:{bound}/", folder)
