"""The model sandbox: a user's ``model.py`` runs in bubblewrap, the model comes back as data.

:func:`build_model_archive` runs :mod:`mlaas4hep.train.sandbox_runner` in a ``bwrap``
child process that has no network (every namespace unshared), a clean environment (no
``RAY_*``, ``MLAAS4HEP_*``, ``AWS_*``; ``HOME=/tmp``), an unprivileged uid, a read-only
view of only what Python and TensorFlow need (the system's ``/usr``, the interpreter, the
virtualenv, the ``mlaas4hep`` package) and a private, size-bounded ``/tmp``. The platform
home, the Ray token, the storage root and the host's ``/tmp`` are not in it (they are
masked when they sit inside one of the folders it sees). The source goes in on stdin; a
tf_keras ``.keras`` archive (config, weights, compile config) comes back on stdout, under
a time limit and a size limit (settings ``sandbox_timeout_s``, ``sandbox_max_output_bytes``).

:func:`load_model_archive` is the trusted side: it checks and loads that archive in safe
mode with :func:`mlaas4hep.modelfiles.safety.load_keras_model` (custom layers and
Lambda refused, naming the layer). No trusted process imports or executes user code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mlaas4hep.settings import Settings, load_settings
from mlaas4hep.train.model_file import MODEL_FUNCTION, ModelSourceError, parse_model_source

if TYPE_CHECKING:
    import tf_keras

logger = logging.getLogger(__name__)

#: The module run inside the sandbox (``python -I -m RUNNER``).
RUNNER = "mlaas4hep.train.sandbox_runner"
#: The whole environment of the sandboxed process.
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
#: The unprivileged uid/gid the sandboxed process runs as (nobody/nogroup).
SANDBOX_UID = 65534
#: System folders bound read-only when they exist (symlinks, as /lib -> usr/lib, are kept).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Single system files the dynamic loader and Python read.
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")
#: Packages the runner imports; their folders are bound when outside the interpreter prefixes.
RUNTIME_PACKAGES = ("mlaas4hep", "tensorflow", "tf_keras", "numpy", "h5py", "pydantic", "yaml")
#: Bytes of the sandbox's stderr kept (its tail) for error messages and the log.
STDERR_TAIL_BYTES = 16 * 1024
#: Room for the answer's JSON header line besides the archive.
HEADER_BYTES = 64 * 1024
#: Seconds the output readers may take after the sandbox ended.
READER_GRACE_S = 5.0
#: Size of the private /tmp: the archive is written there before it is sent.
TMP_EXTRA_BYTES = 256 * 1024**2

#: TensorFlow's start-up lines (absl logging before its init), left out of the forwarded output.
TF_NOISE = re.compile(
    r"^(?:[IWE]\d{4} \S+ +\d+ \S+:\d+\] .*"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called .*"
    r"|To enable the following instructions: .*|rebuild TensorFlow with .*)$",
    re.M,
)

INSTALL_HINT = (
    "install it (Debian/Ubuntu: `sudo apt-get install bubblewrap`, or "
    "`scripts/install-system-packages.sh`), or set MLAAS4HEP_MODEL_SANDBOX=none only where "
    "the process running user code holds no secret"
)


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (bwrap missing or refused); says how to fix it."""


def _local_storage_root(storage: str) -> Path | None:
    """The local folder of a storage URI (None for s3:// and other remote roots)."""
    if storage.startswith("file://"):
        return Path(storage[len("file://") :])
    return None if "://" in storage else Path(storage)


def secret_paths(settings: Settings) -> list[Path]:
    """Paths the sandbox must never show: platform home, issuer keys, Ray token, storage."""
    from mlaas4hep.auth.ray_token import ray_token_path

    paths = [Path(settings.home), settings.issuer_key_dir, ray_token_path(), Path.home() / ".ray"]
    storage = _local_storage_root(settings.storage)
    if storage is not None:
        paths.append(storage)
    return [Path(os.path.abspath(p)) for p in paths]


def _package_root(name: str) -> Path | None:
    """The folder holding package ``name`` (found without importing it), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def runtime_roots() -> list[Path]:
    """Folders the sandbox binds read-only for Python: prefixes and package folders."""
    candidates = [Path(sys.base_prefix), Path(sys.prefix), Path(sys.exec_prefix)]
    candidates += [Path(sys.executable).parent, Path(os.path.realpath(sys.executable)).parent]
    candidates += [p for p in map(_package_root, RUNTIME_PACKAGES) if p is not None]
    roots: list[Path] = []
    for path in sorted({Path(os.path.abspath(p)) for p in candidates}, key=lambda p: len(p.parts)):
        if path.is_dir() and not any(path.is_relative_to(root) for root in roots):
            roots.append(path)
    # A prefix reached through a symlink: its real folder too (interpreter links point there).
    for path in list(roots):
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in roots):
            roots.append(real)
    return roots


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def bwrap_command(settings: Settings, bwrap: str) -> list[str]:
    """The ``bwrap`` argument list that starts the runner (see the module docstring)."""
    tmp_size = settings.sandbox_max_output_bytes + TMP_EXTRA_BYTES
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    args += ["--new-session", "--clearenv", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    args += ["--hostname", "sandbox", "--proc", "/proc", "--dev", "/dev"]
    args += ["--size", str(tmp_size), "--tmpfs", "/tmp"]
    for name in SYSTEM_DIRS:
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    for name in SYSTEM_FILES:
        args += ["--ro-bind-try", name, name]
    bound = runtime_roots()
    for root in bound:
        args += ["--ro-bind", str(root), str(root)]
    roots = bound + [Path(p) for p in SYSTEM_DIRS if os.path.isdir(p)]
    # A secret inside a bound folder (a home under the venv, say) is hidden again.
    for secret in secret_paths(settings):
        if not _within(secret, roots):
            continue
        if secret.is_dir():
            args += ["--tmpfs", str(secret)]
        elif secret.exists():
            args += ["--ro-bind", "/dev/null", str(secret)]
    for name, value in SANDBOX_ENV.items():
        args += ["--setenv", name, value]
    return [*args, "--chdir", "/tmp", "--", sys.executable, "-I", "-m", RUNNER]


def sandbox_command(settings: Settings) -> list[str]:
    """The command that runs the runner as ``settings.model_sandbox`` says.

    Raises :class:`SandboxError` when ``bwrap`` is asked for and not installed.
    """
    if settings.model_sandbox == "none":
        return [sys.executable, "-I", "-m", RUNNER]
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(
            f"the model sandbox needs bubblewrap (bwrap), which is not on PATH: {INSTALL_HINT}"
        )
    return bwrap_command(settings, bwrap)


@dataclass
class _Output:
    """What one sandbox run wrote: stdout up to a bound, the tail of stderr."""

    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    too_large: bool = False

    def read_stdout(self, stream: IO[bytes], on_overflow) -> None:
        while chunk := stream.read(1 << 16):
            if len(self.stdout) + len(chunk) > self.limit:
                self.too_large = True
                on_overflow()
                return
            self.stdout += chunk

    def read_stderr(self, stream: IO[bytes]) -> None:
        while chunk := stream.read(1 << 14):
            self.stderr = (self.stderr + chunk)[-STDERR_TAIL_BYTES:]

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (bwrap takes its children with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _run(command: list[str], request: bytes, settings: Settings) -> tuple[int | None, _Output]:
    """Run ``command`` with ``request`` on stdin; its exit code (None: timed out) and output."""
    output = _Output(limit=settings.sandbox_max_output_bytes + HEADER_BYTES)
    with tempfile.TemporaryDirectory(prefix="mlaas4hep-sandbox-") as cwd:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(SANDBOX_ENV),
            cwd=cwd,
            start_new_session=True,
        )
        readers = [
            threading.Thread(
                target=output.read_stdout, args=(process.stdout, lambda: _kill(process))
            ),
            threading.Thread(target=output.read_stderr, args=(process.stderr,)),
        ]
        for reader in readers:
            reader.daemon = True
            reader.start()
        try:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(request)
                process.stdin.close()
            code: int | None = process.wait(timeout=settings.sandbox_timeout_s)
        except subprocess.TimeoutExpired:
            _kill(process)
            process.wait()
            code = None
        for reader in readers:  # a process that escaped the group may hold a pipe: stop waiting
            reader.join(timeout=READER_GRACE_S)
    return code, output


def _forward_stderr(path: str, text: str) -> None:
    """Show what the user's code printed in this process's stderr (the Ray job log), redacted."""
    text = "\n".join(line for line in TF_NOISE.sub("", text).splitlines() if line.strip())
    if not text:
        return
    from mlaas4hep.auth.redact import Redactor

    redacted = Redactor.from_environment().redact(text)
    sys.stderr.write(f"--- output of {path} in the model sandbox ---\n{redacted}\n---\n")


def _archive_of(path: str, idim: int, code: int | None, output: _Output, settings: Settings):
    """The archive bytes in ``output``, or the error the sandbox run ends with."""
    stderr = output.stderr_text()
    call = f"{MODEL_FUNCTION}({idim})"
    too_large = ModelSourceError(
        f"{path}: the model of {call} is larger than the sandbox's limit of "
        f"{settings.sandbox_max_output_bytes} bytes (setting sandbox_max_output_bytes)"
    )
    if output.too_large:
        raise too_large
    if code is None:
        raise ModelSourceError(
            f"{path}: {call} did not finish within {settings.sandbox_timeout_s:g} s "
            "(setting sandbox_timeout_s)"
        )
    header, _, payload = bytes(output.stdout).partition(b"\n")
    try:
        answer = json.loads(header) if header else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        if stderr.startswith("bwrap:"):
            raise SandboxError(
                f"the model sandbox could not start: {stderr.splitlines()[0]} (bwrap needs "
                "unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 and, "
                "in a container, a seccomp profile that allows them)"
            )
        last = stderr.splitlines()[-1] if stderr else "no output"
        raise ModelSourceError(
            f"{path}: the model sandbox ended (exit status {code}) without a model: {last}"
        )
    if not answer.get("ok"):
        raise ModelSourceError(str(answer.get("error") or f"{path}: {call} gave no model"))
    if len(payload) > settings.sandbox_max_output_bytes:
        raise too_large
    if len(payload) != answer.get("size"):
        raise ModelSourceError(f"{path}: the model sandbox sent a truncated archive")
    return payload


def _plain(value: Any) -> Any:
    """A JSON value for a numpy scalar (Ray Tune samples some parameters as numpy ints)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"model keyword argument {value!r} is not JSON data")


def build_model_archive(
    source: str,
    path: str,
    idim: int,
    kwargs: dict[str, Any] | None = None,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
) -> bytes:
    """Run ``model(idim, **kwargs)`` of model-file ``source`` in the sandbox.

    ``path`` names the file in messages; ``seed`` seeds the random state the model's
    initial weights are drawn from (the training's seed). Returns the bytes of a tf_keras ``.keras``
    archive of the compiled model. Raises :class:`ModelSourceError` (file and line) for a
    broken model file, a time-out or an oversized model, :class:`SandboxError` when the
    sandbox cannot run.
    """
    parse_model_source(source, path)  # syntax errors without starting anything
    settings = settings or load_settings()
    command = sandbox_command(settings)
    request = json.dumps(
        {"source": source, "path": path, "idim": int(idim), "kwargs": kwargs or {}, "seed": seed},
        default=_plain,
    )
    code, output = _run(command, request.encode(), settings)
    _forward_stderr(path, output.stderr_text())
    return _archive_of(path, idim, code, output, settings)


def load_model_archive(
    archive: bytes, path: str, settings: Settings | None = None, *, compile: bool = True
) -> tf_keras.Model:
    """Check and load a model archive of :func:`build_model_archive` in safe mode.

    ``path`` (the model file) names the model in messages. Returns the compiled model;
    raises :class:`~mlaas4hep.modelfiles.safety.UnsafeModelError` naming ``path`` and
    the refused layer (custom layers, ``Lambda``) unless setting ``allowed_model_layers``
    lists it.
    """
    from mlaas4hep.modelfiles.safety import UnsafeModelError, load_keras_model

    settings = settings or load_settings()
    with tempfile.TemporaryDirectory(prefix="mlaas4hep-archive-") as folder:
        target = Path(folder, Path(path).stem + ".keras")
        target.write_bytes(archive)
        try:
            return load_keras_model(target, compile=compile, allowed=settings.allowed_model_layers)
        except UnsafeModelError as error:
            raise UnsafeModelError(f"{path}: the model it builds: {error}") from None
