"""Latency and throughput of the TFaaS service on Ray Serve against plain FastAPI + uvicorn.

Trains a small ``tf_keras`` MLP on demo-data features in this process, serves it

* with a plain FastAPI + uvicorn single process (the baselines: parse, predict, answer),
  calling the Keras model as one traced graph, and calling the platform's numpy forward
  pass of the same model (:data:`BASELINES`), and
* with the TFaaS application on Ray Serve (token check, storage lookup under the
  registry's stamp; single rows predicted in the ingress, the 1024-row ``infer`` requests
  by the multiplexed and batched model deployment; two ingress replicas, one a core),
  once per Serve mode of ``MODES`` (each on its own Ray head, since Serve reads these
  flags when its processes start),

and loads each with the same asyncio ``aiohttp`` generator on loopback: single-row
``/json`` at concurrency 1, 8 and 32 (requests/s, p50/p99), and batched KServe v2
``infer`` (rows/s). Every load is bounded in requests and in seconds. Prints a table and
writes ``benchmarks/results/serve_latency.json``::

    python benchmarks/serve_latency.py [--modes python-proxy,haproxy] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: the platform's heads use tokens

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 8, 32)
INFER_ROWS = 1024
INFER_CONCURRENCY = 4
MODEL = "bench"
SPECS = {
    "fkeys": ["MET_pt", "HT"],
    "jkeys": ["Jet_pt", "Jet_btag"],
    "jdim": {"Jet_pt": 4, "Jet_btag": 4},
    "minv": {"MET_pt": 0.0, "HT": 0.0, "Jet_pt": 20.0, "Jet_btag": 0.0},
    "maxv": {"MET_pt": 300.0, "HT": 1000.0, "Jet_pt": 400.0, "Jet_btag": 1.0},
    "nans": {},
    "events": {"total": 0},
}

#: Serve modes: the local head's ``serve_proxy`` setting, and extra environment of its
#: processes.
MODES: dict[str, tuple[str, dict[str, str]]] = {
    # Ray Serve's own Python proxy
    "python-proxy": ("python", {}),
    # user code and router on the replica's main event loop (fewer thread hops)
    "same-loop": (
        "python",
        {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        },
    ),
    # proxy -> replica over gRPC instead of Ray actor calls
    "grpc": ("python", {"RAY_SERVE_PROXY_USE_GRPC": "1"}),
    # the platform's default: HAProxy in front of ingress replicas serving HTTP themselves
    "haproxy": ("haproxy", {}),
}
#: both: HAProxy, and the ingress's app on the event loop that receives its HTTP requests
MODES["haproxy-same-loop"] = ("haproxy", MODES["same-loop"][1])


# --------------------------------------------------------------------------- model


def train_bundle(folder: Path, events: int = 4000) -> tuple[Path, np.ndarray]:
    """Train an MLP on demo data; write its bundle to ``folder``; return it and test rows."""
    import tf_keras
    import uproot

    from mlaas4hep.platform.demo import DEMO_TREE, write_demo_data
    from mlaas4hep.platform.flatten import flatten_columns, to_model_input
    from mlaas4hep.platform.specs import FeatureSpecs

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
    bundle = folder / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    model.save(bundle / "model.keras")
    (bundle / "params.json").write_text(json.dumps({"name": MODEL, "model": "model.keras"}))
    (bundle / "labels.txt").write_text("background\nsignal\n")
    (bundle / "specs.json").write_text(json.dumps(SPECS))
    return bundle, x


# --------------------------------------------------------------------------- baseline


#: Baselines: how the plain FastAPI app calls the model.
BASELINES = {
    # the Keras model itself, called as one traced graph (``tf.function``): the fastest way
    # to call it from Keras (eager ``model(x)`` ~2.6x slower, ``predict`` ~100x)
    "keras": False,
    # the platform's numpy forward pass of a Dense stack
    "numpy": True,
}


def baseline_app(bundle: Path, call: str) -> Any:
    """Plain FastAPI app: the same parsing, one process, no Serve; the model called the
    ``call`` way of :data:`BASELINES`."""

    from mlaas4hep.serve.bundle import load_bundle, to_matrix
    from mlaas4hep.serve.kserve import infer_response, input_matrix, split_body
    from mlaas4hep.serve.tfaas import rows_response

    model = load_bundle(bundle, MODEL, 1, numpy_dense=BASELINES[call])
    app = FastAPI()

    @app.post("/json")
    async def predict_json(request: Request) -> Any:
        body = json.loads(await request.body())
        out = model.predict(to_matrix(body["values"]))
        return JSONResponse(rows_response(out, not isinstance(body["values"][0], list)))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body, binary = split_body(await request.body(), None)
        return infer_response(body, name, 1, model.predict(input_matrix(body, binary)))

    return app


def run_baseline(bundle: Path, call: str, port: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--baseline-server", str(bundle), "--port", str(port)]
    command += ["--baseline-call", call]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- load


async def _load(
    url: str,
    payload: bytes,
    headers: dict[str, str],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> dict[str, Any]:
    """Send ``payload`` from ``concurrency`` workers until ``max_requests`` or ``max_seconds``."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    headers = {"Content-Type": "application/json", **headers}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(min(20, max_requests)):  # warm up connections and the model
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal errors, sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def measure(
    base: str, headers: dict[str, str], rows: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """The /json and v2 infer figures of the server at ``base``."""
    single = json.dumps({"values": rows[0].tolist(), "model": MODEL}).encode()
    batch = rows[:INFER_ROWS]
    infer = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ]
        }
    ).encode()
    out: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        out[f"json_c{concurrency}"] = asyncio.run(
            _load(f"{base}/json", single, headers, concurrency, args.requests, args.seconds)
        )
    figures = asyncio.run(
        _load(
            f"{base}/v2/models/{MODEL}/infer",
            infer,
            headers,
            INFER_CONCURRENCY,
            args.requests // 10,
            args.seconds,
        )
    )
    figures["rows_per_s"] = round(figures["rps"] * INFER_ROWS)
    out["infer"] = figures
    return out


def wait_http(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


# --------------------------------------------------------------------------- Serve


def mode_env(mode: str) -> dict[str, str]:
    """Environment of a Serve mode's processes (the head reads ``MLAAS4HEP_SERVE_PROXY``)."""
    proxy, env = MODES[mode]
    return {**env, "MLAAS4HEP_SERVE_PROXY": proxy}


def run_mode(mode: str, bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure Serve ``mode`` in a child process (Serve reads its flags at import)."""
    home = Path(tempfile.mkdtemp(prefix=f"mlaas4hep-bench-{mode}-"))
    out = home / "result.json"
    command = [sys.executable, __file__, "--serve-mode", mode, "--bundle", str(bundle)]
    command += ["--requests", str(args.requests), "--seconds", str(args.seconds)]
    command += ["--out", str(out)]
    env = {**os.environ, **mode_env(mode), "MLAAS4HEP_HOME": str(home)}
    try:
        subprocess.run(command, env=env, timeout=900, check=False)
        return json.loads(out.read_text()) if out.is_file() else {"error": "no result"}
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def serve_mode(mode: str, bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start a Ray head (this process's environment), deploy the TFaaS app, measure it,
    stop the head."""
    from mlaas4hep.platform.cluster import loopback_settings, start_head, stop_head

    home = Path(os.environ["MLAAS4HEP_HOME"])
    settings = loopback_settings(home, num_cpus=4)
    import ray
    from ray import serve

    rows = np.load(bundle.parent / "rows.npy")
    try:
        head = start_head(settings)
        ray.init(address=head.gcs_address, log_to_driver=False, logging_level="ERROR")
        return _serve_run(settings, bundle, rows, args, serve)
    except Exception as error:  # a mode this machine cannot run is reported, not fatal
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        stop_head(settings, keep_logs=False)


def _serve_run(settings: Any, bundle: Path, rows: np.ndarray, args: Any, serve: Any) -> dict:
    from mlaas4hep.platform.auth import owner_id
    from mlaas4hep.platform.issuer import LocalIssuer
    from mlaas4hep.platform.registry import ModelRegistry
    from mlaas4hep.platform.storage import Storage
    from mlaas4hep.serve.issuer_app import ISSUER_APP_NAME, ISSUER_ROUTE_PREFIX, build_issuer_app
    from mlaas4hep.serve.tfaas import TFaaSOptions, tfaas_application

    serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
    serve.run(build_issuer_app(settings), name=ISSUER_APP_NAME, route_prefix=ISSUER_ROUTE_PREFIX)
    # one ingress replica a core; no access log (the baseline logs no requests either)
    options = TFaaSOptions(
        ingress_cpus=0.5, model_cpus=0.5, ingress_min_replicas=2, access_log=False
    )
    serve.run(tfaas_application(settings, options), name="tfaas", route_prefix="/")
    issuer = LocalIssuer(
        settings.issuer_key_dir, settings.builtin_issuer_url, settings.oidc_audience
    )
    ModelRegistry(Storage(settings.storage)).register(
        MODEL, bundle, owner=owner_id("bench", issuer.issuer_url), visibility="public"
    )
    base = f"http://127.0.0.1:{settings.port}"
    wait_http(f"{base}/status")
    headers = {"Authorization": f"Bearer {issuer.mint('bench')}"}
    return measure(base, headers, rows, args)


# --------------------------------------------------------------------------- main


def table(results: dict[str, Any]) -> str:
    lines = [
        "| server | c | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, figures in results.items():
        if "error" in figures:
            lines.append(f"| {name} | - | failed: {figures['error']} | | | |")
            continue
        for concurrency in CONCURRENCY:
            f = figures[f"json_c{concurrency}"]
            lines.append(
                f"| {name} /json | {concurrency} | {f['rps']} | {f['p50_ms']} | "
                f"{f['p99_ms']} | {f['errors']} |"
            )
        f = figures["infer"]
        lines.append(
            f"| {name} v2 infer {INFER_ROWS} rows | {INFER_CONCURRENCY} | "
            f"{f['rows_per_s']} rows/s | {f['p50_ms']} | {f['p99_ms']} | {f['errors']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--requests", type=int, default=3000, help="per load (max)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load (max)")
    parser.add_argument("--baseline-server", help=argparse.SUPPRESS)
    parser.add_argument("--serve-mode", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-call", choices=BASELINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        import uvicorn

        app = baseline_app(Path(args.baseline_server), args.baseline_call)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    if args.serve_mode:
        result = serve_mode(args.serve_mode, Path(args.bundle), args)
        Path(args.out).write_text(json.dumps(result))
        return 0

    from mlaas4hep.platform.cluster import free_port

    work = Path(tempfile.mkdtemp(prefix="mlaas4hep-bench-"))
    bundle, rows = train_bundle(work)
    np.save(work / "rows.npy", rows[:INFER_ROWS])
    results: dict[str, Any] = {}
    for call in BASELINES:
        port = free_port()
        server = run_baseline(bundle, call, port)
        try:
            wait_http(f"http://127.0.0.1:{port}/docs")
            results[f"fastapi+uvicorn {call}"] = measure(f"http://127.0.0.1:{port}", {}, rows, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    for mode in args.modes.split(","):
        print(f"measuring Serve mode {mode} ...", flush=True)
        results[f"serve {mode}"] = run_mode(mode, bundle, args)
    shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'serve_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
