"""Where a tenant's spec may read data from: one policy, applied to every submission.

A spec sent over HTTP names its inputs (``files``, ``specs``, ``preproc``, branch-list
files of ``selected_branches``/``exclude_branches``/``identifier``, ``model.file`` and
``redirector``) in one of these ways, and only these:

* ``uploads/<path>``: a file the caller uploaded (``uploads/<owner>/<path>`` of the
  storage); its full storage path or URI is accepted too;
* ``runs/<run_id>/<path>``: a file of the run being submitted (the ``data`` parts of a
  multipart submission), or its storage path or URI;
* a local path or a storage URI below one of the operator's ``shared_data_roots``
  (read-only data every tenant may read, e.g. a CMS Open Data mount);
* a remote URL whose scheme and ``host[:port]`` are on the operator's
  ``allowed_data_hosts`` (a missing port is the scheme's default: 1094 for ``root://``),
  or on the host of the platform's own ``MLAAS4HEP_REDIRECTOR``.

Anything else is refused with :class:`DataAccessError` naming the field, the path and
the rule. The decision is taken from the text of the path and the policy alone, before
anything is opened or connected to, so the answer is the same whether a refused path
exists or not; only a path already inside an allowed root is resolved on disk, and its
real path must stay inside that root (a symlink out of it is refused like the path it
points to). ``..`` segments, fsspec chains (``::``) and URLs with user info are refused
outright. Paths inside the storage root or the platform home follow the first two rules
only, even when a shared root contains them: other tenants' uploads, other runs, models
and the issuer's keys are never shared data.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from mlaas4hep.spec import (
    NameFileReader,
    PipelineSpec,
    SpecError,
    behind_redirector,
    resolve_path,
)

if TYPE_CHECKING:
    from mlaas4hep.settings import Settings
    from mlaas4hep.store.storage import Storage

#: Ports of URL schemes whose allow-list entries may leave the port out.
DEFAULT_PORTS = {"root": 1094, "roots": 1094, "xroot": 1094, "xroots": 1094,
                 "http": 80, "https": 443}  # fmt: skip

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<netloc>[^/?#]*)(?P<rest>.*)$", re.S)
_NETLOC = re.compile(r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                     r"(?::(?P<port>[0-9]{1,5}))?$")  # fmt: skip
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]|::")


class DataAccessError(SpecError):
    """A path a spec may not read; the message names the field, the path and the rule."""


@dataclass(frozen=True)
class Endpoint:
    """A remote data server: scheme, host (lower case) and port."""

    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, url: str) -> Self | None:
        """The endpoint of ``url``; ``None`` when it is no plain ``scheme://host[:port]...``."""
        match = _URL.match(url)
        netloc = _NETLOC.match(match["netloc"]) if match else None
        if match is None or netloc is None:
            return None
        scheme = match["scheme"].lower()
        port = int(netloc["port"]) if netloc["port"] else DEFAULT_PORTS.get(scheme)
        if port is not None and not 0 < port < 65536:
            return None
        return cls(scheme, netloc["host"].lower(), port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _has_dotdot(path: str) -> bool:
    return ".." in path.replace("\\", "/").split("/")


@dataclass(frozen=True)
class DataAccessPolicy:
    """The data one submission may read; see the module docstring for the rules."""

    storage: Storage
    home: str
    shared_local: tuple[str, ...] = ()
    shared_urls: tuple[str, ...] = ()
    hosts: frozenset[Endpoint] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings, storage: Storage | None = None) -> Self:
        """The policy of ``settings`` (``shared_data_roots``, ``allowed_data_hosts``);
        ValueError naming the setting for an entry that cannot be used."""
        from mlaas4hep.store.storage import Storage

        local, urls = [], []
        for root in settings.shared_data_roots:
            root = root.removeprefix("file://") if root.startswith("file:///") else root
            if _URL.match(root):
                urls.append(root.rstrip("/"))
            elif root.startswith(("/", "~")):
                local.append(posixpath.normpath(os.path.expanduser(root)))
            else:
                raise ValueError(f"shared_data_roots: {root!r} is no absolute path or URI")
        hosts = set()
        entries = list(settings.allowed_data_hosts)
        if os.environ.get("MLAAS4HEP_REDIRECTOR"):
            entries.append(os.environ["MLAAS4HEP_REDIRECTOR"])
        for entry in entries:
            endpoint = Endpoint.parse(entry)
            if endpoint is None:
                raise ValueError(f"allowed_data_hosts: {entry!r} is not scheme://host[:port]")
            hosts.add(endpoint)
        return cls(
            storage=storage or Storage(settings.storage),
            home=posixpath.normpath(os.path.expanduser(settings.home)),
            shared_local=tuple(local),
            shared_urls=tuple(urls),
            hosts=frozenset(hosts),
        )

    # -- the rules -------------------------------------------------------------------

    def _local_refusal(self, field: str, path: str) -> DataAccessError:
        roots = ", ".join([*self.shared_local, *self.shared_urls]) or "none"
        return DataAccessError(
            f"{field}: {path!r} is not data you may read: a spec reads your uploads "
            "(uploads/<path>), this run's files (runs/<run_id>/...), the shared data roots "
            f"({roots}) or remote hosts on the allow-list"
        )

    def _host_refusal(self, field: str, path: str, endpoint: Endpoint | None) -> DataAccessError:
        allowed = ", ".join(sorted(map(str, self.hosts))) or "none"
        what = (
            f": host {endpoint} is not" if endpoint else " is no scheme://host[:port]/path URL of"
        )
        return DataAccessError(
            f"{field}: {path!r}{what} a data host on the operator's allow-list "
            f"(allowed_data_hosts: {allowed})"
        )

    def resolve(self, path: str, field: str, owner: str, run_id: str | None) -> str:
        """The path or URL ``path`` (named in the spec's ``field``) resolves to, when
        ``owner``'s run ``run_id`` may read it; :class:`DataAccessError` otherwise."""
        if not isinstance(path, str) or not path or _UNSAFE.search(path) or _has_dotdot(path):
            raise self._local_refusal(field, str(path))
        if path.startswith("file://"):
            if not path.startswith("file:///"):
                raise self._local_refusal(field, path)
            return self._local(path.removeprefix("file://"), path, field, owner, run_id)
        if _URL.match(path):
            return self._url(path, field, owner, run_id)
        if path.startswith("/"):
            return self._local(path, path, field, owner, run_id)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if parts[:1] == ["uploads"]:  # the shorthand: relative to the caller's own uploads
            parts.insert(1, owner)
        return self._in_storage(parts, path, field, owner, run_id)

    def _url(self, url: str, field: str, owner: str, run_id: str | None) -> str:
        store = self.storage
        if not store.is_local and _inside(url, store.uri()):
            parts = [p for p in url[len(store.uri()) :].split("/") if p]
            return self._in_storage(parts, url, field, owner, run_id)
        if any(_inside(url, root) for root in self.shared_urls):
            return url
        endpoint = Endpoint.parse(url)
        if endpoint is None or endpoint not in self.hosts:
            raise self._host_refusal(field, url, endpoint)
        return url

    def _in_storage(
        self, parts: list[str], shown: str, field: str, owner: str, run_id: str | None
    ) -> str:
        """``parts`` below the storage root, if the caller's uploads or this run hold it."""
        own = {("uploads", owner)} | ({("runs", run_id)} if run_id else set())
        if len(parts) < 3 or (parts[0], parts[1]) not in own:
            raise self._local_refusal(field, shown)
        if self.storage.is_local:
            base = os.path.realpath(self.storage.path(parts[0], parts[1]))
            real = os.path.realpath(self.storage.path(*parts))
            if not _inside(real, base):
                raise self._local_refusal(field, shown)
        return self.storage.uri(*parts)

    def _storage_parts(self, path: str) -> list[str] | None:
        """``path``'s parts below the local storage root (lexically or resolved), or None."""
        if not self.storage.is_local:
            return None
        for root in {self.storage.root, os.path.realpath(self.storage.root)}:
            if _inside(path, root):
                return [p for p in path[len(root) :].split("/") if p]
        return None

    def _local(self, path: str, shown: str, field: str, owner: str, run_id: str | None) -> str:
        clean = posixpath.normpath(path)
        parts = self._storage_parts(clean)
        if parts is not None:
            return self._in_storage(parts, shown, field, owner, run_id)
        homes = {self.home, os.path.realpath(self.home)}
        root = next((r for r in self.shared_local if _inside(clean, r)), None)
        if root is None or any(_inside(clean, h) for h in homes):
            raise self._local_refusal(field, shown)
        # Inside a shared root by its text: only now is the disk asked where it leads.
        real = os.path.realpath(clean)
        if self._storage_parts(real) is not None or any(_inside(real, h) for h in homes):
            raise self._local_refusal(field, shown)
        if not _inside(real, os.path.realpath(root)):
            raise self._local_refusal(field, shown)
        return real

    # -- a whole spec ----------------------------------------------------------------

    def check_spec(self, spec: PipelineSpec, owner: str, run_id: str | None) -> PipelineSpec:
        """A copy of ``spec`` with every path it reads resolved (logical ``/store/...``
        and other remote names put behind the redirector first); :class:`DataAccessError`
        for the first path ``owner``'s run ``run_id`` may not read.

        A redirector is checked against the allow-list when a file is read through it
        (MLaaS4HEP's params carry its default redirector beside local files)."""
        spec = spec.model_copy(deep=True)
        if any(behind_redirector(item.path, spec.redirector) for item in spec.files):
            self._url_prefix(spec.redirector, "redirector")
        for index, item in enumerate(spec.files):
            where = f"files[{index}].path"
            item.path = self.resolve(resolve_path(item.path, spec.redirector), where, owner, run_id)
        if spec.specs is not None:
            spec.specs = self.resolve(spec.specs, "specs", owner, run_id)
        if isinstance(spec.preproc, str):
            spec.preproc = self.resolve(spec.preproc, "preproc", owner, run_id)
        if spec.model.file is not None:
            spec.model.file = self.resolve(spec.model.file, "model.file", owner, run_id)
        return spec

    def _url_prefix(self, url: str, field: str) -> None:
        """Refuse a redirector whose host is off the allow-list."""
        endpoint = Endpoint.parse(url)
        if _UNSAFE.search(url) or endpoint is None or endpoint not in self.hosts:
            raise self._host_refusal(field, url, endpoint)

    def name_file_reader(self, owner: str, run_id: str | None) -> NameFileReader:
        """A reader of branch-list files for :func:`~mlaas4hep.spec.parse_spec`:
        ``(path, field)`` → the names in the file, after the path was checked (None when an
        allowed path holds no such file: the text is then a name)."""

        def read(path: str, field: str) -> list[str] | None:
            resolved = self.resolve(path, field, owner, run_id)
            import fsspec

            try:
                with fsspec.open(resolved, "r") as stream:
                    text = stream.read(1_000_000)
            except (FileNotFoundError, IsADirectoryError):
                return None
            return [ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#"]

        return read
