"""The model sandbox: a user's model.py reaches none of the platform's secrets or data.

A probe model file tries, inside ``model(idim)``, to read the platform home's issuer keys,
the session's Ray token, the storage root and another tenant's upload, to write into
storage, to find secrets in its environment and to connect to a loopback listener this
test opened; it records what happened in the name of the model it returns. The sandbox
build runs once for the module (one TensorFlow import); the same file then trains
through a real pipeline on the session cluster and registers a model.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import zipfile
from pathlib import Path

import pytest

from mlaas4hep.auth.redact import MASK, Redactor
from mlaas4hep.modelfiles.safety import UnsafeModelError
from mlaas4hep.spec import ModelSpec, parse_spec
from mlaas4hep.train.model_file import ModelSourceError
from mlaas4hep.train.models import build_model
from mlaas4hep.train.sandbox import SandboxError, build_model_archive

#: An environment secret of the process that starts the sandbox.
ENV_SECRET = "aws-secret-of-the-platform-0123456789"

PROBE = """\
import json, os, socket
from tensorflow import keras

def _try(action):
    try:
        value = action()
    except Exception as error:
        return "denied:" + type(error).__name__
    return "got:" + str(len(value) if hasattr(value, "__len__") else value)

def _write(path):
    with open(path, "w") as out:
        out.write("escaped")
    return "written"

def _connect(port):
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return "connected"

def model(idim):
    report = {{
        "issuer keys": _try(lambda: open({keys!r}).read()),
        "platform home": _try(lambda: os.listdir({home!r})),
        "ray token": _try(lambda: open({token!r}).read()),
        "home ray folder": _try(lambda: os.listdir({home_ray!r})),
        "storage root": _try(lambda: os.listdir({storage!r})),
        "other upload": _try(lambda: open({upload!r}).read()),
        "storage write": _try(lambda: _write({escape!r})),
        "network": _try(lambda: _connect({port})),
        "env": sorted(k for k in os.environ if k.startswith(("RAY_", "MLAAS4HEP_", "AWS_"))),
        "env secret": any({secret!r} in v for v in os.environ.values()),
    }}
    net = keras.Sequential(
        [keras.layers.Dense(8, activation="relu", input_shape=(idim,)),
         keras.layers.Dense(1, activation="sigmoid")],
        name="probe_" + json.dumps(report).encode().hex(),
    )
    net.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return net
"""


def report_of(name: str) -> dict:
    """The probe's report from the name of the model it built."""
    assert name.startswith("probe_"), name
    return json.loads(bytes.fromhex(name[len("probe_") :]))


@pytest.fixture(scope="module")
def secrets(platform_settings, tmp_path_factory):
    """The platform's secrets and another tenant's upload, as they exist on the host."""
    from mlaas4hep.auth.issuer import builtin_issuer
    from mlaas4hep.auth.ray_token import ensure_ray_token, ray_token_path

    issuer = builtin_issuer(platform_settings)
    ensure_ray_token()
    storage = Path(platform_settings.storage)
    upload = storage / "uploads" / "victim" / "private.root"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_text("another tenant's data")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    yield {
        "keys": str(issuer.key_file),
        "home": platform_settings.home,
        "token": str(ray_token_path()),
        "home_ray": str(Path.home() / ".ray"),
        "storage": str(storage),
        "upload": str(upload),
        "escape": str(storage / "uploads" / "mallory" / "escaped.txt"),
        "listener": listener,
    }
    listener.close()


@pytest.fixture(scope="module")
def probe_file(secrets, tmp_path_factory) -> Path:
    values = {k: v for k, v in secrets.items() if k != "listener"}
    source = PROBE.format(port=secrets["listener"].getsockname()[1], secret=ENV_SECRET, **values)
    path = tmp_path_factory.mktemp("mallory") / "model.py"
    path.write_text(source)
    return path


@pytest.fixture(scope="module")
def probe(probe_file):
    """The report of the probe built once, with a secret in the environment that builds it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
        model = build_model(ModelSpec(file=str(probe_file)), 6)
    return report_of(model.name)


def test_model_file_cannot_read_issuer_keys_ray_token_storage_or_other_uploads(probe, secrets):
    for attempt in (
        "issuer keys",
        "platform home",
        "ray token",
        "home ray folder",
        "storage root",
        "other upload",
    ):
        assert probe[attempt].startswith("denied:"), (attempt, probe[attempt])
    # They exist on the host: the sandbox hid them.
    assert Path(secrets["keys"]).is_file() and Path(secrets["token"]).is_file()
    assert Path(secrets["upload"]).is_file()


def test_model_file_cannot_write_into_the_storage_root(probe, secrets):
    assert probe["storage write"].startswith("denied:"), probe["storage write"]
    assert not Path(secrets["escape"]).exists()


def test_model_file_sees_no_platform_variables_or_secrets_in_its_environment(probe):
    assert os.environ.get("MLAAS4HEP_HOME") and os.environ.get("RAY_AUTH_TOKEN_PATH")
    assert probe["env"] == []
    assert probe["env secret"] is False


def test_model_file_cannot_connect_to_a_loopback_listener(probe, secrets):
    assert probe["network"].startswith("denied:"), probe["network"]
    with pytest.raises(BlockingIOError):  # nothing ever connected to the listener
        secrets["listener"].accept()


def write_model(tmp_path: Path, text: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_model_with_a_lambda_layer_is_refused_naming_the_layer(tmp_path):
    path = write_model(
        tmp_path,
        """\
        from tensorflow import keras

        def model(idim):
            net = keras.Sequential([
                keras.layers.Dense(4, input_shape=(idim,)),
                keras.layers.Lambda(lambda x: x * 2, name="doubler"),
                keras.layers.Dense(1, activation="sigmoid"),
            ])
            net.compile(loss="binary_crossentropy", optimizer="adam")
            return net
        """,
    )
    with pytest.raises(UnsafeModelError, match=r"Lambda") as info:
        build_model(ModelSpec(file=str(path)), 4)
    assert str(path) in str(info.value)


def test_model_with_a_custom_layer_class_is_refused_naming_it(tmp_path):
    path = write_model(
        tmp_path,
        """\
        from tensorflow import keras

        class Twice(keras.layers.Layer):
            def call(self, x):
                return 2 * x

        def model(idim):
            inputs = keras.Input(shape=(idim,))
            outputs = keras.layers.Dense(1, activation="sigmoid")(Twice()(inputs))
            net = keras.Model(inputs, outputs)
            net.compile(loss="binary_crossentropy", optimizer="adam")
            return net
        """,
    )
    with pytest.raises(UnsafeModelError, match=r"Twice"):
        build_model(ModelSpec(file=str(path)), 4)


def test_model_running_past_the_time_limit_is_stopped_naming_the_setting(
    platform_settings, tmp_path
):
    path = write_model(tmp_path, "import time\n\ndef model(idim):\n    time.sleep(600)\n")
    settings = platform_settings.model_copy(update={"sandbox_timeout_s": 1.0})
    with pytest.raises(ModelSourceError, match=r"did not finish within 1 s .*sandbox_timeout_s"):
        build_model_archive(path.read_text(), str(path), 3, settings=settings)


def test_model_larger_than_the_output_limit_is_refused_naming_the_setting(
    platform_settings, tmp_path
):
    path = write_model(
        tmp_path,
        """\
        from tensorflow import keras

        def model(idim):
            net = keras.Sequential([keras.layers.Dense(1, input_shape=(idim,))])
            net.compile(loss="mse", optimizer="sgd")
            return net
        """,
    )
    settings = platform_settings.model_copy(update={"sandbox_max_output_bytes": 1000})
    with pytest.raises(ModelSourceError, match=r"larger than .* 1000 bytes .*max_output_bytes"):
        build_model_archive(path.read_text(), str(path), 3, settings=settings)


def test_missing_bwrap_fails_with_how_to_install_it(platform_settings, tmp_path, monkeypatch):
    path = write_model(tmp_path, "def model(idim):\n    return None\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    with pytest.raises(SandboxError, match=r"bubblewrap \(bwrap\).*apt-get install bubblewrap"):
        build_model_archive(path.read_text(), str(path), 3, settings=platform_settings)


def test_platform_home_inside_a_bound_folder_is_hidden_again(platform_settings):
    import sys

    from mlaas4hep.train.sandbox import bwrap_command

    home = Path(sys.prefix) / "lib"  # a home that happens to sit inside the bound venv
    settings = platform_settings.model_copy(update={"home": str(home)})
    args = bwrap_command(settings, "bwrap")
    binds = [i for i, a in enumerate(args) if a == "--ro-bind" and args[i + 1] == sys.prefix]
    masks = [i for i, a in enumerate(args) if a == "--tmpfs" and args[i + 1] == str(home)]
    assert binds and masks and masks[0] > binds[0]  # mounted over the bind


ENV_REPORT = """\
import os

def model(idim):
    names = sorted(k for k in os.environ if k.startswith(("MLAAS4HEP_", "RAY_", "AWS_")))
    raise RuntimeError("environment: " + (",".join(names) or "clean"))
"""


@pytest.mark.parametrize("mode", ["bwrap", "none"])
def test_model_file_runs_in_a_child_with_a_clean_environment_in_both_modes(
    platform_settings, tmp_path, mode
):
    path = write_model(tmp_path, ENV_REPORT)
    settings = platform_settings.model_copy(update={"model_sandbox": mode})
    clean = r"line 5: model\(3\) raised RuntimeError: environment: clean$"
    with pytest.raises(ModelSourceError, match=clean):
        build_model_archive(path.read_text(), str(path), 3, settings=settings)


# --------------------------------------------------------------------------- secrets redacted


def test_redactor_masks_the_ray_token_and_the_issuer_private_key(platform_settings, secrets):
    token = Path(secrets["token"]).read_text().strip()
    keys = json.loads(Path(secrets["keys"]).read_text())["keys"]
    private = [key[m] for key in keys for m in ("d", "p", "q") if m in key]
    text = f"token={token} jwk={json.dumps(keys)}"
    redacted = Redactor.from_settings(platform_settings).redact(text)
    assert private and token not in redacted
    assert not any(value in redacted for value in private)
    assert MASK in redacted and keys[0]["kid"] in redacted  # public parts stay


# --------------------------------------------------------------------------- real pipeline


def pipeline_spec(name: str, files: list[dict], model_file: Path):
    return parse_spec(
        {
            "name": name,
            "files": files,
            "identifier": ["run", "event", "luminosityBlock"],
            "epochs": 1,
            "batch_size": 64,
            "model": str(model_file),
            "resources": {"num_workers": 1},
        }
    )


@pytest.mark.ray
def test_probe_file_trains_through_a_pipeline_and_registers_a_model(
    ray_cluster, probe_file, tmp_path
):
    from mlaas4hep.cli.demo import write_demo_data
    from mlaas4hep.pipeline.orchestrator import run_pipeline
    from mlaas4hep.store.registry import ModelRegistry
    from mlaas4hep.store.runs import new_run_id
    from mlaas4hep.store.storage import Storage

    signal, background = write_demo_data(tmp_path / "data", events=300, seed=3)
    files = [{"path": str(signal), "label": 1}, {"path": str(background), "label": 0}]
    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    record = run_pipeline(pipeline_spec("probed", files, probe_file), run_id, "mallory", storage)

    assert record["state"] == "SUCCEEDED", record.get("message")
    version = ModelRegistry(storage).get("probed")
    assert record["model"] == {"name": "probed", "version": version.version}
    with zipfile.ZipFile(Path(version.path) / "model.keras") as archive:
        name = json.loads(archive.read("config.json"))["config"]["name"]
    report = report_of(name)  # the registered model is the one the sandbox built
    attempts = {k: v for k, v in report.items() if k not in ("env", "env secret")}
    assert all(v.startswith("denied:") for v in attempts.values()), attempts


@pytest.mark.ray
def test_failed_pipeline_status_and_log_never_carry_the_ray_token(
    ray_cluster, probe_file, secrets, tmp_path
):
    from mlaas4hep.pipeline.orchestrator import run_pipeline
    from mlaas4hep.store.runs import new_run_id
    from mlaas4hep.store.storage import Storage

    token = Path(secrets["token"]).read_text().strip()
    files = [{"path": str(tmp_path / f"{token}.root"), "label": 1}]  # an error names the path
    storage = Storage(str(tmp_path / "storage"))
    run_id = new_run_id()
    with pytest.raises(Exception):  # noqa: B017 - the job fails, whatever the error
        run_pipeline(pipeline_spec("leaky", files, probe_file), run_id, "mallory", storage)

    status = storage.read_json("runs", run_id, "status.json")
    log = storage.read_text("runs", run_id, "log")
    assert status["state"] == "FAILED"
    assert MASK in status["message"] and token not in status["message"]
    assert MASK in log and token not in log
