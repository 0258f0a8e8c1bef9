"""Fixtures of the inference service tests: tiny real Keras bundles, the deployed
TFaaS application, and tokens of the built-in issuer.

``tests/conftest.py`` registers the fixtures for the whole suite (one session-wide
instance of each); test modules import the helpers directly; the helpers hold no
asserts, so the module is not assert-rewritten (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

N_FEATURES = 4
FEATURES = ["pt", "eta", "phi", "mass"]
APP_NAME = "tfaas-test"
ROUTE_PREFIX = "/tfaas-test"
#: Small enough to test the limit with a fake member, large enough for tiny models.
MAX_MEMBER_BYTES = 400_000


def make_bundle(
    folder: Path,
    name: str,
    n_outputs: int = 1,
    seed: int = 0,
    params_keys: str = "camel",
    feature_names: list[str] | None = None,
    specs: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle with a tiny real ``tf_keras`` MLP into ``folder``; return ``folder``.

    ``params_keys`` picks the TFaaS spelling: ``camel`` (inputNode) or ``snake`` (input_node);
    with ``specs`` (MLaaS4HEP specs.json content) the model takes its features.
    """
    n_features = N_FEATURES
    if specs is not None:
        n_features = len(specs["fkeys"]) + sum(specs["jdim"].values())
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    activation = "sigmoid" if n_outputs == 1 else "softmax"
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input(shape=(n_features,), name="features"),
            tf_keras.layers.Dense(8, activation="relu"),
            tf_keras.layers.Dense(n_outputs, activation=activation, name="scores"),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    nodes = (
        {"inputNode": "features", "outputNode": "scores"}
        if params_keys == "camel"
        else {"input_node": "features", "output_node": "scores"}
    )
    params = {"name": name, "model": "model.keras", "labels": "labels.txt", **nodes}
    (folder / "params.json").write_text(json.dumps(params))
    labels = ["background", "signal"] if n_outputs == 1 else [f"class{i}" for i in range(n_outputs)]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    metadata = {"feature_names": feature_names or FEATURES, "run_id": "test"}
    if specs is not None:
        (folder / "specs.json").write_text(json.dumps(specs))
        metadata = {"run_id": "test"}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def make_image_bundle(folder: Path, name: str, shape: tuple[int, int, int] = (8, 8, 1)) -> Path:
    """Write a bundle with a tiny real ``tf_keras`` CNN taking ``shape`` images and giving
    three class probabilities (labels ``zero one two``), TFaaS ``img_channels`` in params."""
    import tf_keras

    tf_keras.utils.set_random_seed(7)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input(shape=shape, name="image"),
            tf_keras.layers.Conv2D(4, 3, activation="relu"),
            tf_keras.layers.MaxPooling2D(2),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(3, activation="softmax", name="scores"),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    params = {
        "name": name,
        "model": "model.keras",
        "labels": "labels.txt",
        "img_channels": shape[2],
        "input_node": "image",
        "output_node": "scores",
    }
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "labels.txt").write_text("zero\none\ntwo\n")
    return folder


def local_predict(bundle: Path, x: np.ndarray) -> np.ndarray:
    """``model(x)`` computed in the test process from the bundle's model.keras."""
    import tf_keras

    model = tf_keras.models.load_model(bundle / "model.keras", compile=False)
    return np.asarray(model(np.asarray(x, dtype=np.float32), training=False))


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A gzip tarball of ``files`` (path -> bytes) and symbolic ``links`` (path -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for path, target in (links or {}).items():
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def bundle_tarball(bundle: Path, top: str = "") -> bytes:
    prefix = f"{top}/" if top else ""
    return tarball({prefix + p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()})


@dataclass
class TFaaS:
    """The deployed test application and what tests need to call it."""

    url: str
    settings: Any
    issuer: Any

    def token(self, sub: str = "alice", groups: tuple[str, ...] = ("/cms",)) -> str:
        return self.issuer.mint(sub, groups=list(groups))

    def headers(self, sub: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub)}"}

    def owner(self, sub: str = "alice") -> str:
        from mlaas4hep.auth.oidc import owner_id

        return owner_id(sub, self.issuer.issuer_url)

    @property
    def registry(self) -> Any:
        from mlaas4hep.store.registry import ModelRegistry
        from mlaas4hep.store.storage import Storage

        return ModelRegistry(Storage(self.settings.storage))

    def client(self, sub: str = "alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(sub), timeout=60)


@pytest.fixture(scope="session")
def tfaas(serve_url: str, platform_settings: Any) -> TFaaS:
    """The TFaaS app on the session's Serve proxy (2 replicas of each deployment) and
    the built-in issuer app its tokens come from."""
    from ray import serve

    from mlaas4hep.auth.issuer import LocalIssuer
    from mlaas4hep.serve.apps.inference import tfaas_application
    from mlaas4hep.serve.apps.issuer_app import (
        ISSUER_APP_NAME,
        ISSUER_ROUTE_PREFIX,
        build_issuer_app,
    )
    from mlaas4hep.serve.dataplane import TFaaSOptions

    options = TFaaSOptions(
        ingress_min_replicas=2,
        model_min_replicas=2,
        max_member_bytes=MAX_MEMBER_BYTES,
    )
    serve.run_many(  # both apps' replicas start together
        [
            serve.RunTarget(
                build_issuer_app(platform_settings),
                name=ISSUER_APP_NAME,
                route_prefix=ISSUER_ROUTE_PREFIX,
            ),
            serve.RunTarget(
                tfaas_application(platform_settings, options),
                name=APP_NAME,
                route_prefix=ROUTE_PREFIX,
            ),
        ]
    )
    issuer = LocalIssuer(
        platform_settings.issuer_key_dir,
        platform_settings.builtin_issuer_url,
        platform_settings.oidc_audience,
    )
    yield TFaaS(f"{serve_url}{ROUTE_PREFIX}", platform_settings, issuer)
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def higgs(tfaas: TFaaS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-output bundle registered as model ``higgs`` owned by alice (snake-case
    params keys, as some TFaaS versions wrote them)."""
    bundle = make_bundle(tmp_path_factory.mktemp("higgs"), "higgs", params_keys="snake")
    tfaas.registry.register("higgs", bundle, owner=tfaas.owner("alice"))
    return bundle


@pytest.fixture(scope="session")
def multi(tfaas: TFaaS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-class bundle registered as model ``multi`` owned by alice."""
    bundle = make_bundle(tmp_path_factory.mktemp("multi"), "multi", n_outputs=3, seed=1)
    tfaas.registry.register("multi", bundle, owner=tfaas.owner("alice"))
    return bundle


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)
