"""Serving throughput as any client gets it: the platform against plain FastAPI + uvicorn,
both loaded with Debian's ``hey``, one event per request.

One command, in one run:

* trains a 64-32-1 ``tf_keras`` MLP on demo-data features (18 inputs) and saves it twice,
  as a ``.keras`` file and as a TF SavedModel (``tf.saved_model.save``, a serving
  signature);
* starts the **baseline**: one plain FastAPI + uvicorn process serving both (the Keras
  model called as one traced graph, the SavedModel through its serving signature), no
  token, no storage;
* starts the **platform** the way a user does: ``mlaas4hep up`` (default settings: HAProxy
  in front of the ingress replicas, every application), a token from ``mlaas4hep token``,
  both models uploaded as gzip bundles to ``POST /upload``;
* for each model and route (TFaaS ``/json`` and KServe v2 ``infer``), loads the baseline
  and then the platform with ``hey -z <seconds>s -c <concurrency>`` (after a warm-up of
  ``hey -n 400``), and parses hey's summary (req/s, p50, p99, status codes, errors);
* stops the platform (``mlaas4hep down``), prints the table and writes
  ``benchmarks/results/serve_latency.json`` with the machine's load average around each
  load (the machine may be shared).

With ``--profile`` the platform's ingress replica is sampled with ``py-spy`` (GIL samples)
during the ``/json`` loads and the heaviest frames are added to the JSON. About 4 minutes::

    python benchmarks/serve_latency.py [--seconds 15] [--concurrency 32] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import json
import os
import platform as host
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
#: model name -> the file or folder its bundle's params.json names
MODELS = {"dense-keras": "model.keras", "dense-savedmodel": "saved_model"}
ROUTES = ("json", "infer")
SPECS = {
    "fkeys": ["MET_pt", "HT"],
    "jkeys": ["Jet_pt", "Jet_btag"],
    "jdim": {"Jet_pt": 4, "Jet_btag": 4},
    "minv": {"MET_pt": 0.0, "HT": 0.0, "Jet_pt": 20.0, "Jet_btag": 0.0},
    "maxv": {"MET_pt": 300.0, "HT": 1000.0, "Jet_pt": 400.0, "Jet_btag": 1.0},
    "nans": {},
    "events": {"total": 0},
}


# --------------------------------------------------------------------------- models


def train_bundles(folder: Path, events: int = 4000) -> tuple[dict[str, Path], np.ndarray]:
    """Train the MLP on demo data and write one bundle per entry of :data:`MODELS` under
    ``folder``; return ``{model name: bundle folder}`` and a few feature rows."""
    import tensorflow as tf
    import tf_keras
    import uproot

    from mlaas4hep.cli.demo import DEMO_TREE, write_demo_data
    from mlaas4hep.data.features import FeatureSpecs
    from mlaas4hep.data.flatten import flatten_columns, to_model_input

    specs = FeatureSpecs.from_dict(SPECS)
    xs, ys = [], []
    for label, path in enumerate(reversed(write_demo_data(folder / "data", events))):
        arrays = uproot.open(path)[DEMO_TREE].arrays([*specs.fkeys, *specs.jkeys])
        features, _ = flatten_columns({k: arrays[k] for k in arrays.fields}, specs)
        xs.append(to_model_input(features))
        ys.append(np.full(len(features), label, dtype=np.float32))
    x, y = np.concatenate(xs), np.concatenate(ys)
    tf_keras.utils.set_random_seed(1)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input(shape=(specs.n_features,)),
            tf_keras.layers.Dense(64, activation="relu"),
            tf_keras.layers.Dense(32, activation="relu"),
            tf_keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, epochs=3, batch_size=256, verbose=0, shuffle=True)
    bundles = {}
    for name, file in MODELS.items():
        bundle = folder / name
        bundle.mkdir(parents=True)
        if file.endswith(".keras"):
            model.save(bundle / file)
        else:
            signature = tf.TensorSpec([None, specs.n_features], tf.float32, name="input")
            serve = tf.function(lambda t: {"output": model(t, training=False)}, autograph=False)
            tf.saved_model.save(
                model, str(bundle / file), signatures=serve.get_concrete_function(signature)
            )
        (bundle / "params.json").write_text(json.dumps({"name": name, "model": file}))
        (bundle / "labels.txt").write_text("signal\n")
        (bundle / "specs.json").write_text(json.dumps(SPECS))
        bundles[name] = bundle
    return bundles, x[:64]


def tarball(folder: Path) -> bytes:
    """``folder``'s files as a gzip tarball (a TFaaS bundle upload)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------- baseline


def baseline_app(bundles: dict[str, Path]) -> Any:
    """Plain FastAPI app serving every bundle: parse, call the model, answer; no token, no
    storage, no Serve. A Keras file is called as one traced graph (``tf.function``, the
    fastest call of a Keras model; ``predict`` is ~100x slower for one row), a SavedModel
    through its ``serving_default`` signature."""
    import tensorflow as tf
    import tf_keras

    calls = {}
    for name, bundle in bundles.items():
        path = bundle / MODELS[name]
        if path.is_dir():
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            calls[name] = lambda x, s=signature: next(iter(s(tf.constant(x)).values())).numpy()
        else:
            keras = tf_keras.models.load_model(path, compile=False)
            spec = tf.TensorSpec([None, *keras.input_shape[1:]], tf.float32)
            graph = tf.function(lambda t, m=keras: m(t, training=False), input_signature=[spec])
            calls[name] = lambda x, g=graph: g(x).numpy()
    app = FastAPI()

    @app.post("/json")
    async def predict_json(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        out = calls[body["model"]](np.asarray(body["values"], dtype=np.float32).reshape(1, -1))
        return JSONResponse(out[0].tolist())

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> JSONResponse:
        tensor = json.loads(await request.body())["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        out = calls[name](x)
        output = {"name": "output", "shape": list(out.shape), "datatype": "FP32"}
        return JSONResponse(
            {"model_name": name, "outputs": [{**output, "data": out.ravel().tolist()}]}
        )

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


# --------------------------------------------------------------------------- platform


class Platform:
    """The platform as a user starts it: ``mlaas4hep up`` in a private home on free ports."""

    def __init__(self, home: Path) -> None:
        from mlaas4hep.platform.cluster import free_port

        self.home = home
        self.port = free_port()
        self.env = {
            **os.environ,
            "MLAAS4HEP_HOME": str(home),
            "MLAAS4HEP_PORT": str(self.port),
            "MLAAS4HEP_RAY_PORT": str(free_port()),
            "MLAAS4HEP_DASHBOARD_PORT": str(free_port()),
            "MLAAS4HEP_GRPC_PORT": str(free_port()),
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""

    def cli(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [str(BIN / "mlaas4hep"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mlaas4hep {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def up(self, bundles: dict[str, Path]) -> None:
        """``mlaas4hep up``, a token, and every bundle uploaded to ``POST /upload``."""
        import httpx

        self.cli("up")
        self.token = self.cli("token", "--user", "bench").strip()
        headers = {"Authorization": f"Bearer {self.token}"}
        for name, bundle in bundles.items():
            answer = httpx.post(
                f"{self.url}/upload",
                params={"name": name, "visibility": "public"},
                content=tarball(bundle),
                headers={**headers, "Content-Type": "application/octet-stream"},
                timeout=300,
            )
            if answer.status_code != 200:
                print(f"upload of {name}: {answer.status_code} {answer.text[:300]}")

    def down(self) -> None:
        self.cli("down", "--remove-logs", timeout=120)

    def ingress_pids(self) -> list[int]:
        """The pids of the inference app's ingress replicas (listening on a direct-ingress
        port of this head), sorted."""
        import psutil

        ports = range(self.port + 1, self.port + 65)
        pids = set()
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == "LISTEN" and conn.laddr.port in ports and conn.pid:
                with contextlib.suppress(Exception):
                    if "TFaaSIngress" in " ".join(psutil.Process(conn.pid).cmdline()):
                        pids.add(conn.pid)
        return sorted(pids)

    def ingress_pid(self) -> int | None:
        """The pid of one ingress replica of the inference app, or None."""
        return next(iter(self.ingress_pids()), None)


# --------------------------------------------------------------------------- load


def bodies(rows: np.ndarray) -> dict[tuple[str, str], bytes]:
    """Request body of each (model, route): one event."""
    row = rows[0].tolist()
    out = {}
    for name in MODELS:
        out[(name, "json")] = json.dumps({"values": row, "model": name}).encode()
        tensor = {"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}
        out[(name, "infer")] = json.dumps({"inputs": [tensor]}).encode()
    return out


def route_url(base: str, model: str, route: str) -> str:
    return f"{base}/json" if route == "json" else f"{base}/v2/models/{model}/infer"


def hey(url: str, body: Path, token: str | None, *load: str) -> dict[str, Any]:
    """Run ``hey`` with the ``load`` options (``-z 15s -c 32``, ``-n 400 -c 8``) as a
    user does; hey's summary parsed, with the load average before and after."""
    command = ["hey", *load, "-m", "POST", "-T", "application/json", "-D", str(body)]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    before = os.getloadavg()[0]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=600)
    figures = parse_hey(done.stdout)
    figures["load_average"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return figures


def parse_hey(text: str) -> dict[str, Any]:
    """req/s, p50/p99 (ms), responses by status and error count of hey's summary."""

    def number(pattern: str) -> float:
        found = re.search(pattern, text)
        return float(found.group(1)) if found else float("nan")

    statuses = {int(s): int(n) for s, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    return {
        "rps": round(number(r"Requests/sec:\s+([\d.]+)"), 1),
        "p50_ms": round(number(r"50%+ in ([\d.]+) secs") * 1e3, 2),
        "p99_ms": round(number(r"99%+ in ([\d.]+) secs") * 1e3, 2),
        "requests": sum(statuses.values()),
        "non_200": sum(n for s, n in statuses.items() if s != 200),
        "errors": sum(int(n) for n in re.findall(r"\[(\d+)\]\s", errors)),
    }


def agreement(servers: dict[str, tuple[str, str | None]], rows: np.ndarray) -> dict[str, bool]:
    """Whether every server answers each (model, route) with the same outputs (to 1e-4):
    the loads compare servers of the same model."""
    import httpx

    out: dict[str, bool] = {}
    for (model, route), body in bodies(rows).items():
        answers = []
        for base, token in servers.values():
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            answer = httpx.post(route_url(base, model, route), content=body, headers=headers)
            data = answer.json() if answer.status_code == 200 else None
            if isinstance(data, dict):
                data = data["outputs"][0]["data"]
            answers.append(np.asarray(data if data is not None else np.nan, dtype=np.float64))
        first = answers[0]
        out[f"{model} {route}"] = all(
            a.shape == first.shape and np.allclose(a, first, atol=1e-4) for a in answers
        )
    return out


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """``py-spy record`` of GIL-holding samples of ``pid`` for ``seconds`` into ``out``
    (raw stacks)."""
    command = [str(BIN / "py-spy"), "record", "-p", str(pid), "-d", str(int(seconds))]
    command += ["-r", "200", "-f", "raw", "--gil", "--nonblocking", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def heaviest_frames(raw: Path, top: int = 40) -> list[str]:
    """The frames (function and file) found in most samples of a raw py-spy profile, as
    ``"<percent of samples> <frame>"``."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        frames = set()
        for frame in stack.split(";"):  # "function (path/file.py:line)"
            function, _, where = frame.partition(" (")
            file = where.rsplit("/", 1)[-1].rsplit(":", 1)[0].rstrip(")")
            frames.add(f"{function} ({file})")
        for frame in frames:
            counts[frame] += int(n)
    return [f"{100 * n / total:.1f}% {frame}" for frame, n in counts.most_common(top)]


# --------------------------------------------------------------------------- main


def measure(
    servers: dict[str, tuple[str, str | None]],
    rows: np.ndarray,
    args: argparse.Namespace,
    work: Path,
    platform: Platform,
) -> dict[str, Any]:
    """Every (model, route, server) load, baseline and platform back to back."""
    results: dict[str, Any] = {"agree": agreement(servers, rows)}
    for (model, route), body in bodies(rows).items():
        path = work / f"{model}-{route}.json"
        path.write_bytes(body)
        for server, (base, token) in servers.items():
            url = route_url(base, model, route)
            warm = hey(url, path, token, "-n", "400", "-c", "8")
            spy, raw = None, work / f"profile-{model}.txt"
            if args.profile and server == "platform" and route == "json":
                pid = platform.ingress_pid()
                spy = profile(pid, args.seconds - 2, raw) if pid else None
            figures = hey(url, path, token, "-z", f"{args.seconds}s", "-c", str(args.concurrency))
            if warm["non_200"] or warm["errors"]:
                figures["warm_up"] = warm
            if spy is not None:
                spy.wait(timeout=120)
                if raw.is_file():
                    figures["profile"] = heaviest_frames(raw)
            results[f"{server} {model} {route}"] = figures
            print(f"{server:9} {model:17} {route:6} {figures}", flush=True)
    return results


def table(results: dict[str, Any], concurrency: int) -> str:
    lines = [
        f"| model | route | server | req/s at c={concurrency} | p50 ms | p99 ms | non-200 "
        "| vs baseline |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        for route in ROUTES:
            base = results.get(f"baseline {model} {route}", {})
            for server in ("baseline", "platform"):
                f = results.get(f"{server} {model} {route}")
                if not f:
                    continue
                ratio = f["rps"] / base["rps"] if base.get("rps") else float("nan")
                lines.append(
                    f"| {model} | {route} | {server} | {f['rps']} | {f['p50_ms']} | "
                    f"{f['p99_ms']} | {f['non_200'] + f['errors']} | {ratio:.2f}x |"
                )
    return "\n".join(lines)


def machine(load_start: tuple[float, ...]) -> dict[str, Any]:
    """The machine of a run: cores, Python, load average at its start and at its end."""
    return {
        "cpus": os.cpu_count(),
        "python": host.python_version(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }


def run_baseline_server(bundles: dict[str, Path], port: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--baseline-port", str(port)]
    command += ["--bundles", json.dumps({k: str(v) for k, v in bundles.items()})]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_http(url: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="of each measured load")
    parser.add_argument("--concurrency", type=int, default=32, help="hey -c")
    parser.add_argument("--profile", action="store_true", help="py-spy the platform's ingress")
    parser.add_argument("--baseline-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bundles", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_port:
        import uvicorn

        bundles = {k: Path(v) for k, v in json.loads(args.bundles).items()}
        app = baseline_app(bundles)
        uvicorn.run(app, host="127.0.0.1", port=args.baseline_port, log_level="warning")
        return 0
    if shutil.which("hey") is None:
        print("hey is not installed (Debian package 'hey'; scripts/install-system-packages.sh)")
        return 2

    from mlaas4hep.platform.cluster import free_port

    RESULTS.mkdir(exist_ok=True)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="mlaas4hep-bench-"))
    load_start = os.getloadavg()
    bundles, rows = train_bundles(work)
    port = free_port()
    baseline = run_baseline_server(bundles, port)
    platform = Platform(work / "home")
    try:
        platform.up(bundles)
        wait_http(f"http://127.0.0.1:{port}/ready")
        servers = {
            "baseline": (f"http://127.0.0.1:{port}", None),
            "platform": (platform.url, platform.token),
        }
        results = measure(servers, rows, args, work, platform)
    finally:
        baseline.terminate()
        baseline.wait(timeout=30)
        with contextlib.suppress(Exception):
            platform.down()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results, args.concurrency))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine(load_start),
        "load": {"tool": "hey", "seconds": args.seconds, "concurrency": args.concurrency},
        "seconds": round(time.time() - started),
        "results": results,
    }
    (RESULTS / "serve_latency.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS / 'serve_latency.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
