"""Data paths confined: a tenant's spec reads its own uploads, its run's files, the shared
data roots and allow-listed hosts only; resource limits count what Ray is asked for;
preprocessing expressions are bounded.

The policy is tried alone first, then through every submission route of the API with
tokens of a real OIDC provider. Only one test trains (a tiny model on uploaded files).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from oidc_fixtures import OIDCProvider, api_settings, serve_apis
from serve_fixtures import tarball, wait_for
from xrootd_fixtures import XRootDServer

from mlaas4hep.data.access import DataAccessError, DataAccessPolicy
from mlaas4hep.data.errors import DataError
from mlaas4hep.data.preproc import Expression
from mlaas4hep.store.storage import Storage

HZZ = "uproot-HZZ.root"
RULE = "is not data you may read"
HOST_RULE = "a data host on the operator's allow-list"


# --- the policy alone ------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """A shared root, the storage and the platform home, side by side."""
    folders = {name: tmp_path / name for name in ("shared", "storage", "home", "outside")}
    for folder in folders.values():
        folder.mkdir()
    (folders["shared"] / "events.root").write_bytes(b"shared")
    (folders["outside"] / "secret.root").write_bytes(b"secret")
    (folders["shared"] / "escape.root").symlink_to(folders["outside"] / "secret.root")
    return folders


def policy_of(roots: dict[str, Path], *shared: Path, hosts: tuple[str, ...] = ()):
    from mlaas4hep.settings import Settings

    settings = Settings(
        home=str(roots["home"]),
        storage=str(roots["storage"]),
        shared_data_roots=[str(p) for p in shared or (roots["shared"],)],
        allowed_data_hosts=list(hosts),
    )
    return DataAccessPolicy.from_settings(settings)


def refusal(policy: DataAccessPolicy, path: str, owner: str = "alice") -> str:
    with pytest.raises(DataAccessError) as refused:
        policy.resolve(path, "files[0].path", owner, "run-1")
    return str(refused.value)


def test_existing_and_missing_host_paths_are_refused_with_one_message(roots) -> None:
    policy = policy_of(roots)
    existing = refusal(policy, str(roots["outside"] / "secret.root"))
    missing = refusal(policy, str(roots["outside"] / "no-such-file.root"))
    assert RULE in existing and "secret.root" in existing
    assert existing.replace("secret", "X") == missing.replace("no-such-file", "X")
    etc = refusal(policy, "/etc/passwd")
    assert etc.replace("/etc/passwd", "X") == refusal(policy, "/etc/no-such-file").replace(
        "/etc/no-such-file", "X"
    )


def test_dotdot_and_symlinks_out_of_a_shared_root_are_refused_like_any_outside_path(
    roots,
) -> None:
    policy = policy_of(roots)
    assert policy.resolve(str(roots["shared"] / "events.root"), "f", "a", None) == str(
        roots["shared"] / "events.root"
    )
    outside = refusal(policy, str(roots["outside"] / "secret.root"))
    for sneaky in (
        str(roots["shared"] / ".." / "outside" / "secret.root"),
        str(roots["shared"] / "escape.root"),
        "file://" + str(roots["outside"] / "secret.root"),
    ):
        assert refusal(policy, sneaky).replace(sneaky, "X") == outside.replace(
            str(roots["outside"] / "secret.root"), "X"
        )


def test_uploads_name_the_callers_own_and_another_tenants_prefix_is_refused(roots) -> None:
    policy = policy_of(roots)
    storage = Storage(str(roots["storage"]))
    storage.write_bytes(b"mine", "uploads", "alice", "x.root")
    storage.write_bytes(b"bob's", "uploads", "bob", "x.root")
    own = storage.path("uploads", "alice", "x.root")
    assert policy.resolve("uploads/x.root", "f", "alice", None) == own
    assert policy.resolve(own, "f", "alice", None) == own
    assert policy.resolve("runs/run-1/inputs/a.root", "f", "alice", "run-1").endswith(
        "runs/run-1/inputs/a.root"
    )
    for path in (
        storage.path("uploads", "bob", "x.root"),
        "uploads/../bob/x.root",
        "runs/run-2/inputs/a.root",
        storage.path("models", "m", "1", "model.keras"),
    ):
        assert RULE in refusal(policy, path)


def test_storage_and_home_inside_a_shared_root_stay_private(roots, tmp_path: Path) -> None:
    policy = policy_of(roots, tmp_path)  # an operator sharing the folder holding them all
    Storage(str(roots["storage"])).write_bytes(b"bob's", "uploads", "bob", "x.root")
    (roots["home"] / "issuer").mkdir()
    (roots["home"] / "issuer" / "signing-keys.jwks").write_text("{}")
    assert policy.resolve(str(roots["shared"] / "events.root"), "f", "alice", None)
    for path in (
        roots["storage"] / "uploads" / "bob" / "x.root",
        roots["home"] / "issuer" / "signing-keys.jwks",
    ):
        assert RULE in refusal(policy, str(path))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("root://127.0.0.1:1094//store/a.root", True),
        ("ROOT://127.0.0.1:1094//store/a.root", True),
        ("root://xcache.cern.ch//store/a.root", True),  # the default port, 1094
        ("root://xcache.cern.ch:1095//store/a.root", False),
        ("root://127.0.0.1:1095//store/a.root", False),
        ("root://127.0.0.1:1094@evil.org//a.root", False),
        ("root://evil.org#@127.0.0.1:1094//a.root", False),
        ("https://127.0.0.1:1094/a.root", False),
        ("simplecache::root://127.0.0.1:1094//a.root", False),
        ("root://127.0.0.1:1094//store/../../etc/passwd", False),
    ],
)
def test_remote_urls_pass_only_with_an_allow_listed_scheme_host_and_port(
    roots, url: str, allowed: bool
) -> None:
    policy = policy_of(roots, hosts=("root://127.0.0.1:1094", "root://xcache.cern.ch"))
    if allowed:
        assert policy.resolve(url, "files[0].path", "alice", None) == url
    else:
        message = refusal(policy, url)
        assert HOST_RULE in message or RULE in message
        assert url in message


def test_check_spec_resolves_every_path_and_names_the_field_it_refuses(roots) -> None:
    from mlaas4hep.spec import parse_spec

    policy = policy_of(roots, hosts=("root://127.0.0.1:1094",))
    shared = str(roots["shared"] / "events.root")
    data = {
        "files": [{"path": "/store/a.root", "label": 1}, {"path": shared, "label": 0}],
        "redirector": "root://127.0.0.1:1094",
        "specs": "uploads/specs.json",
        "preproc": "runs/run-1/inputs/preproc.json",
    }
    checked = policy.check_spec(parse_spec(data), "alice", "run-1")
    assert [f.path for f in checked.files] == ["root://127.0.0.1:1094//store/a.root", shared]
    assert checked.specs == str(roots["storage"] / "uploads" / "alice" / "specs.json")
    assert checked.preproc == str(roots["storage"] / "runs" / "run-1" / "inputs" / "preproc.json")
    for field, change in [
        ("redirector", {"redirector": "root://10.0.0.1:1094"}),
        ("specs", {"specs": "/etc/specs.json"}),
        ("preproc", {"preproc": "/etc/preproc.json"}),
        ("model.file", {"model": "/etc/model.py"}),
    ]:
        with pytest.raises(DataAccessError, match=f"^{re.escape(field)}: "):
            policy.check_spec(parse_spec({**data, **change}), "alice", "run-1")


def test_mlaas4hep_redirector_is_checked_when_files_are_read_through_it(roots) -> None:
    """MLaaS4HEP's params.json carries its default redirector beside local files: unused,
    it is no reason to refuse; used by a relative or /store/ name, it must be on the list."""
    from mlaas4hep.spec import parse_spec

    policy = policy_of(roots, hosts=("root://xcache:1094",))
    shared = str(roots["shared"] / "events.root")
    data = {"files": [{"path": shared, "label": 1}], "redirector": "root://cms-xrd-global.cern.ch"}
    assert [f.path for f in policy.check_spec(parse_spec(data), "alice", None).files] == [shared]
    for name in ("/store/data/a.root", "data/a.root"):
        remote = {**data, "files": [{"path": name, "label": 0}]}
        with pytest.raises(DataAccessError) as refused:
            policy.check_spec(parse_spec(remote), "alice", None)
        assert str(refused.value) == (
            "redirector: 'root://cms-xrd-global.cern.ch': host root://cms-xrd-global.cern.ch:1094 "
            "is not a data host on the operator's allow-list (allowed_data_hosts: "
            "root://xcache:1094)"
        )
    allowed = {"files": [{"path": "data/a.root", "label": 0}], "redirector": "root://xcache"}
    checked = policy.check_spec(parse_spec(allowed), "alice", None)
    assert [f.path for f in checked.files] == ["root://xcache/data/a.root"]


def test_branch_list_files_are_read_only_through_the_policy(roots) -> None:
    from mlaas4hep.spec import SpecError, parse_spec

    policy = policy_of(roots)
    (roots["shared"] / "names.txt").write_text("Jet_Px\nMET_px\n")
    (roots["outside"] / "names.txt").write_text("root:x:0:0\n")
    reader = policy.name_file_reader("alice", None)
    spec = {"files": [{"path": "a.root", "label": 1}]}
    shared = parse_spec(
        {**spec, "selected_branches": str(roots["shared"] / "names.txt")}, name_files=reader
    )
    assert shared.selected_branches == ["Jet_Px", "MET_px"]
    with pytest.raises(SpecError) as refused:
        parse_spec(
            {**spec, "exclude_branches": str(roots["outside"] / "names.txt")}, name_files=reader
        )
    assert RULE in str(refused.value) and "exclude_branches" in str(refused.value)
    assert "root:x" not in str(refused.value)


# --- preprocessing bounds -----------------------------------------------------------------


def balanced_sum(terms: int) -> str:
    """``x + x + ...`` of ``terms`` terms as a balanced tree (shallow, but many nodes)."""
    if terms == 1:
        return "x"
    return f"({balanced_sum(terms // 2)}+{balanced_sum(terms - terms // 2)})"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x + 9**9**9**9", "raises to the power"),
        ("x * 2**200", "above the bound"),
        ("x + 99999999999999999999999", "above the bound"),
        ("'a' * 10**12", "only numbers are allowed"),
        ("x + (1 << 100000)", "LShift, not allowed"),
        ("x >> 3", "RShift, not allowed"),
        (balanced_sum(128), "has more than 200 terms"),
        ("x" + "+x" * 100, "nests deeper than 64 levels"),
        ("-" * 900 + "x", "nests deeper than"),
        ("x + " + "1" * 1200, "characters long"),
        ("x ** 1000", "raises to the power 1000"),
    ],
)
def test_preproc_bombs_are_refused_when_parsed(text: str, reason: str) -> None:
    with pytest.raises(DataError) as refused:
        Expression(text, "preproc: new_branch.bomb")
    message = str(refused.value)
    assert message.startswith("preproc: new_branch.bomb: ") and reason in message


def test_bounded_constants_are_folded_and_evaluation_errors_name_the_expression() -> None:
    import numpy as np

    folded = Expression("x * 2**10 - -3", "new_branch.a")
    assert folded.evaluate({"x": np.array([1.0, 2.0])}).tolist() == [1027.0, 2051.0]
    broken = Expression("x ** -1", "new_branch.b")
    with pytest.raises(DataError, match=r"^new_branch.b: 'x \*\* -1' cannot be evaluated"):
        broken.evaluate({"x": np.array([1, 2])})


# --- through the API --------------------------------------------------------------------


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    """A loopback TCP listener that no allow-list names."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.5)
    yield sock
    sock.close()


def assert_no_connection(sock: socket.socket) -> None:
    try:
        connection, _ = sock.accept()
    except TimeoutError:
        return
    connection.close()
    pytest.fail("the platform connected to a host off the allow-list")


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    """A host folder that is no shared root, with a file and a branch list in it."""
    folder = tmp_path_factory.mktemp("private")
    (folder / "secret.root").write_bytes(b"secret")
    (folder / "names.txt").write_text("root:x:0:0\n")
    return folder


@pytest.fixture(scope="module")
def linked_root(tmp_path_factory, private: Path) -> Path:
    """A shared root holding a symlink to the private file."""
    folder = tmp_path_factory.mktemp("linked-root")
    (folder / "escape.root").symlink_to(private / "secret.root")
    return folder


@pytest.fixture(scope="module")
def api(platform_settings, oidc_provider: OIDCProvider, tmp_path_factory, shared_data, linked_root):
    settings = api_settings(
        platform_settings,
        oidc_provider.issuer,
        shared_data_roots=[str(shared_data), str(linked_root)],
        max_workers_per_pipeline=2,
        max_cpus_per_pipeline=4,
        max_gpus_per_pipeline=0,
        max_custom_resources_per_pipeline=2,
        max_active_pipelines=2,
    )
    server = serve_apis(settings, tmp_path_factory.mktemp("apis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokens(oidc_provider) -> dict[str, str]:
    return {user: oidc_provider.token(user) for user in ("alice", "bob")}


def call(api, tokens, user: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tokens[user]}"}
    return httpx.request(method, api.base_url + path, headers=headers, timeout=60, **kwargs)


def submit(api, tokens, spec: dict, user: str = "alice", **body) -> httpx.Response:
    return call(api, tokens, user, "POST", "/api/v1/pipelines", json={"spec": spec, **body})


def hzz_spec(path: str, **changes) -> dict:
    spec = {"name": "confined", "files": [{"path": path, "label": 1}], "branch": "events"}
    return {**spec, "selected_branches": ["Jet_Px", "MET_px"], **changes}


def refused(answer: httpx.Response) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]


def mlaas4hep_submit(api, tokens, files: str, labels: str, params: str) -> httpx.Response:
    """The MLaaS4HEP server flow for alice: upload a folder with these files.txt,
    labels.txt and params.json, submit it; the folder is deleted after."""
    texts = {"files.txt": files, "labels.txt": labels, "params.json": params, "model.py": ""}
    folder = tarball({f"f/{name}": text.encode() for name, text in texts.items()})
    upload = call(
        api,
        tokens,
        "alice",
        "POST",
        "/mlaas4hep/upload",
        params={"name": "flow"},
        files={"file": ("f.tar.gz", folder)},
    )
    assert upload.status_code == 200, upload.text
    names = {"files": "files.txt", "labels": "labels.txt", "params": "params.json"}
    body = {"name": "flow", "model": "model.py", **names}
    try:
        return call(api, tokens, "alice", "POST", "/mlaas4hep/submit", json=body)
    finally:
        call(api, tokens, "alice", "GET", "/mlaas4hep/delete_folder", params={"name": "flow"})


def test_host_paths_outside_the_roots_answer_alike_whether_they_exist_or_not(
    api, tokens, private: Path
) -> None:
    answers = {
        path: refused(submit(api, tokens, hzz_spec(path)))
        for path in (
            "/etc/passwd",
            "/etc/no-such-file",
            str(private / "secret.root"),
            str(private / "no-such-file.root"),
        )
    }
    shapes = {message.replace(path, "<path>") for path, message in answers.items()}
    assert len(shapes) == 1, answers
    assert RULE in next(iter(shapes))
    assert "spec: invalid spec" not in next(iter(shapes))


def test_escapes_symlinks_and_another_tenants_upload_are_refused(
    api, tokens, shared_data: Path, linked_root: Path, platform_settings
) -> None:
    content = (shared_data / HZZ).read_bytes()
    put = call(api, tokens, "bob", "PUT", f"/api/v1/files/{HZZ}", content=content)
    assert put.status_code == 201, put.text
    bob = call(api, tokens, "bob", "GET", "/api/v1/whoami").json()["owner"]
    storage = Storage(platform_settings.storage)
    for path in (
        storage.path("uploads", bob, HZZ),
        f"uploads/../{bob}/{HZZ}",
        str(shared_data / ".." / ".." / "etc" / "passwd"),
        str(linked_root / "escape.root"),
    ):
        message = refused(submit(api, tokens, hzz_spec(path)))
        assert message.startswith(f"files[0].path: {path!r} {RULE}")
    # alice's uploads/ is her own: bob's file of that name does not exist for her.
    mine = refused(submit(api, tokens, hzz_spec(f"uploads/{HZZ}")))
    assert "file not found" in mine and bob not in mine
    call(api, tokens, "bob", "DELETE", f"/api/v1/files/{HZZ}")


def test_branch_lists_and_redirectors_off_limits_are_refused_unread(
    api, tokens, shared_data: Path, private: Path
) -> None:
    hzz = str(shared_data / HZZ)
    names = refused(
        submit(api, tokens, hzz_spec(hzz, selected_branches=str(private / "names.txt")))
    )
    assert RULE in names and "root:x" not in names
    redirector = refused(
        submit(api, tokens, hzz_spec("/store/a.root", redirector="root://10.0.0.1"))
    )
    assert redirector.startswith("redirector: 'root://10.0.0.1': host root://10.0.0.1:1094")


def test_root_urls_off_the_allow_list_are_refused_on_every_route_without_connecting(
    api, tokens, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    url = f"root://127.0.0.1:{port}//data/x.root"
    expected = f"files[0].path: {url!r}: host root://127.0.0.1:{port} is not {HOST_RULE}"

    json_route = refused(submit(api, tokens, hzz_spec(url)))
    assert json_route.startswith(expected)
    assert_no_connection(listener)

    spec_text = json.dumps(hzz_spec(url)).encode()
    multipart = call(
        api,
        tokens,
        "alice",
        "POST",
        "/api/v1/pipelines/upload",
        files=[("spec", ("spec.json", spec_text)), ("data", ("x.root", b"x"))],
    )
    assert refused(multipart).startswith(expected)
    assert_no_connection(listener)

    server_route = mlaas4hep_submit(api, tokens, f"{url}\n", "1\n", '{"branch": "events"}')
    assert refused(server_route).startswith(expected)
    assert_no_connection(listener)


def test_mlaas4hep_folder_listing_host_files_is_refused(api, tokens) -> None:
    answer = mlaas4hep_submit(
        api, tokens, "/etc/passwd\n../../../../etc/hostname\n", "1\n0\n", "{}"
    )
    assert refused(answer).startswith(f"files[0].path: '/etc/passwd' {RULE}")


def test_allow_listed_xrootd_is_read_and_the_limits_then_apply(
    api, tokens, session_xrootd: XRootDServer, shared_data: Path
) -> None:
    url = session_xrootd.add(shared_data / HZZ)
    # Past the policy, the file is opened over root://: refused only by the worker limit.
    message = refused(submit(api, tokens, hzz_spec(url, resources={"num_workers": 3})))
    assert message == (
        "spec.resources.num_workers: the pipeline asks for 3 workers; at most 2 per pipeline"
    )


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (
            {"num_workers": 2, "resources_per_worker": {"CPU": 16, "GPU": 1}},
            "spec.resources.resources_per_worker: the pipeline asks for 32 CPU (2 workers x 16); "
            "at most 4 per pipeline",
        ),
        (
            {"num_workers": 1, "resources_per_worker": {"GPU": 1}},
            "spec.resources.resources_per_worker: the pipeline asks for 1 GPU (1 workers x 1); "
            "at most 0 per pipeline",
        ),
        (
            {"num_workers": 2, "cpus_per_worker": 3},
            "spec.resources.cpus_per_worker: the pipeline asks for 6 CPU (2 workers x 3); "
            "at most 4 per pipeline",
        ),
        (
            {"num_workers": 2, "resources_per_worker": {"data_node": 1.5}},
            "spec.resources.resources_per_worker: the pipeline asks for 3 data_node "
            "(2 workers x 1.5); at most 2 per pipeline",
        ),
        (
            {"read_resources": {"data_node": 5}},
            "spec.resources.read_resources: the pipeline asks for 5 data_node per read task; "
            "at most 2 per pipeline",
        ),
        (
            {"read_resources": {"CPU": 16}},
            "spec.resources.read_resources: 'CPU' cannot be asked per read task (each takes one "
            "CPU); name custom resources only",
        ),
    ],
)
def test_resources_over_the_limits_are_refused_naming_the_field(
    api, tokens, shared_data: Path, resources: dict, message: str
) -> None:
    spec = hzz_spec(str(shared_data / HZZ), resources=resources)
    assert refused(submit(api, tokens, spec)) == message


@pytest.mark.parametrize(
    "expression", ["Jet_Px + 9**9**9**9", "'a' * 10**12", "MET_px * (1 << 4000)"]
)
def test_preproc_bombs_are_refused_at_submission(api, tokens, shared_data: Path, expression):
    preproc = {"new_branch": {"bomb": {"def": expression, "type": "flat"}}}
    spec = hzz_spec(str(shared_data / HZZ), preproc=preproc)
    message = refused(submit(api, tokens, spec))
    assert message.startswith(f"preproc: new_branch.bomb: {expression!r} ")


def test_limits_answer_before_any_input_is_opened_and_errors_name_uploads_as_sent(
    api, tokens
) -> None:
    put = call(api, tokens, "alice", "PUT", "/api/v1/files/bad/not-root.root", content=b"junk")
    assert put.status_code == 201, put.text
    try:
        spec = hzz_spec("uploads/bad/not-root.root")
        over = {"num_workers": 2, "resources_per_worker": {"CPU": 16}}
        # The limit is known from the spec alone: it answers without reading the file.
        assert refused(submit(api, tokens, {**spec, "resources": over})).startswith(
            "spec.resources.resources_per_worker: "
        )
        message = refused(submit(api, tokens, spec))
        assert message.startswith("uploads/bad/not-root.root: "), message
        assert "/uploads/" not in message  # not where the platform keeps it
    finally:
        call(api, tokens, "alice", "DELETE", "/api/v1/files/bad/not-root.root")


def test_client_sends_the_local_files_a_spec_names_with_it(api, tokens, tmp_path: Path) -> None:
    from mlaas4hep.cli.client import ClientError, PlatformClient
    from mlaas4hep.cli.demo import write_demo_data

    signal, background = write_demo_data(tmp_path / "private-data", events=200, seed=4)
    (tmp_path / "names.txt").write_text("MET_pt\nHT\n")
    spec = {
        "name": "uploaded",
        "files": [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}],
        "selected_branches": str(tmp_path / "names.txt"),
        "resources": {"num_workers": 3},
    }
    client = PlatformClient(api.base_url, tokens["alice"])
    try:
        with pytest.raises(ClientError) as raised:
            client.submit(spec)
    finally:
        client.close()
    # The copies sent with the spec were read: only the worker limit refuses it.
    assert str(raised.value) == (
        "422: spec.resources.num_workers: the pipeline asks for 3 workers; at most 2 per pipeline"
    )


def test_client_names_local_files_by_part_and_leaves_platform_names(tmp_path: Path) -> None:
    from mlaas4hep.cli.client import local_inputs

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "events.root").write_bytes(b"x")
    (tmp_path / "specs.json").write_text("{}")
    spec = {
        "files": [str(tmp_path / "a" / "events.root"), {"path": str(tmp_path / "b/events.root")},
                  {"path": "uploads/mine.root"}, {"path": "root://eos.cern.ch//x.root"},
                  {"path": str(tmp_path / "missing.root")}],
        "specs": str(tmp_path / "specs.json"),
        "exclude_branches": "run,event",
    }  # fmt: skip
    data, parts = local_inputs(spec)
    assert [f if isinstance(f, str) else f["path"] for f in data["files"]] == [
        "events.root", "1-events.root", "uploads/mine.root", "root://eos.cern.ch//x.root",
        str(tmp_path / "missing.root"),
    ]  # fmt: skip
    assert data["specs"] == "specs.json" and data["exclude_branches"] == ["run", "event"]
    assert parts == {
        "events.root": tmp_path / "a" / "events.root",
        "1-events.root": tmp_path / "b" / "events.root",
        "specs.json": tmp_path / "specs.json",
    }


def test_pipeline_job_refuses_a_stored_spec_its_owner_may_not_read(
    platform_settings, tmp_path: Path, capsys
) -> None:
    from mlaas4hep.cli.main import main
    from mlaas4hep.store.runs import RunStore, new_run_id

    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    RunStore(storage).create(run_id, owner="mallory", name="x")  # as the API records it
    spec = {"name": "x", "files": [{"path": "/etc/passwd", "label": 1}]}
    storage.write_json(spec, "runs", run_id, "spec.json")
    code = main(
        [
            "run",
            storage.path("runs", run_id, "spec.json"),
            "--run-id",
            run_id,
            "--owner",
            "mallory",
            "--storage",
            storage.root,
        ]
    )
    assert code == 1
    assert f"files[0].path: '/etc/passwd' {RULE}" in capsys.readouterr().err
    record = RunStore(storage).get(run_id)
    assert record["state"] == "FAILED" and RULE in record["message"]


@pytest.mark.ray
def test_uploaded_files_named_as_uploads_train_a_model(
    ray_cluster, api, tokens, tmp_path: Path
) -> None:
    from mlaas4hep.cli.demo import write_demo_data

    for path in write_demo_data(tmp_path, events=300, seed=9):
        put = call(
            api,
            tokens,
            "alice",
            "PUT",
            f"/api/v1/files/train/{path.name}",
            content=path.read_bytes(),
        )
        assert put.status_code == 201, put.text
    spec = {
        "name": "confined-train",
        "files": [
            {"path": "uploads/train/signal.root", "label": 1},
            {"path": "uploads/train/background.root", "label": 0},
        ],
        "selected_branches": ["MET_pt", "HT", "nJet"],
        "epochs": 1,
        "resources": {"num_workers": 1},
        "model": {"mlp": {"layers": [4]}},
    }
    answer = submit(api, tokens, spec)
    assert answer.status_code == 201, answer.text
    run_id = answer.json()["id"]

    def finished() -> bool:
        state = call(api, tokens, "alice", "GET", f"/api/v1/pipelines/{run_id}").json()["state"]
        return state in {"SUCCEEDED", "FAILED", "CANCELLED"}

    wait_for(finished, timeout=600)
    record = call(api, tokens, "alice", "GET", f"/api/v1/pipelines/{run_id}").json()
    assert record["state"] == "SUCCEEDED", record.get("message")
    stored = json.loads(
        call(api, tokens, "alice", "GET", f"/api/v1/pipelines/{run_id}/artifacts/spec.json").text
    )
    alice = call(api, tokens, "alice", "GET", "/api/v1/whoami").json()["owner"]
    assert all(os.sep.join(("uploads", alice, "train")) in f["path"] for f in stored["files"])


def test_tune_trials_running_at_once_count_toward_the_limits(api, tokens, shared_data: Path):
    tune = {"search_space": {"learning_rate": [0.1, 0.01, 0.001]}, "max_concurrent_trials": 3}
    spec = hzz_spec(str(shared_data / HZZ), resources={"num_workers": 1}, tune=tune)
    assert refused(submit(api, tokens, spec)) == (
        "spec.resources.num_workers: the pipeline asks for 3 workers (3 concurrent trials x 1 "
        "workers); at most 2 per pipeline"
    )
    spec = hzz_spec(
        str(shared_data / HZZ),
        resources={"num_workers": 1, "cpus_per_worker": 3},
        tune={**tune, "max_concurrent_trials": 2},
    )
    assert refused(submit(api, tokens, spec)) == (
        "spec.resources.cpus_per_worker: the pipeline asks for 6 CPU (2 concurrent trials x 1 "
        "workers x 3); at most 4 per pipeline"
    )
