"""The ``mlaas4hep`` command.

Platform: ``up``, ``down``, ``token``. Clients of the HTTP API: ``submit``, ``status``,
``logs``, ``predict``, ``demo``. Pipeline and data: ``run`` (the Ray Job's entrypoint),
``demo-data``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlaas4hep.platform.settings import Settings, load_settings

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None)
        for key in ("host", "port", "storage", "num_cpus", "dashboard_port", "ray_port")
    }
    return load_settings(**overrides)


def _client(args: argparse.Namespace):
    from mlaas4hep.client import PlatformClient, resolve_token

    settings = _settings(args)
    url = getattr(args, "url", None) or settings.api_url
    return PlatformClient(url, resolve_token(settings, getattr(args, "token", None)))


def cmd_up(args: argparse.Namespace) -> int:
    """Start the embedded default: local Ray head, Serve apps, built-in issuer, storage."""
    import ray

    from mlaas4hep.platform.cluster import port_open, ray_env, start_head
    from mlaas4hep.platform.storage import Storage
    from mlaas4hep.serve.apps import deploy

    settings = _settings(args)
    Storage(settings.storage)
    for key, value in ray_env().items():
        os.environ.setdefault(key, value)
    os.environ["RAY_AUTH_MODE"] = "token"
    head = start_head(settings)
    if port_open(settings.host if settings.host != "0.0.0.0" else "127.0.0.1", settings.port):
        print(f"(port {settings.port} answers already; redeploying the applications)")
    if settings.uses_builtin_issuer:
        from mlaas4hep.platform.issuer import builtin_issuer

        builtin_issuer(settings)  # creates the signing key before any replica reads it
    ray.init(address=head.gcs_address, log_to_driver=False, logging_level="ERROR")
    try:
        names = deploy(settings)
    finally:
        ray.shutdown()
    print(f"mlaas4hep is up ({', '.join(names)})")
    print(f"  API:        {settings.api_url}/api/v1   (docs: {settings.api_url}/api/v1/docs)")
    print(f"  TFaaS:      {settings.api_url}/json, /models, /v2/...")
    print(f"  dashboard:  {head.dashboard_url}")
    print(f"  storage:    {settings.storage}")
    if settings.uses_builtin_issuer:
        print(f"  issuer:     {settings.builtin_issuer_url} (built-in)")
        print("  token:      export MLAAS4HEP_TOKEN=$(mlaas4hep token)")
    print("  stop with:  mlaas4hep down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop what ``up`` started."""
    from mlaas4hep.platform.cluster import stop_head

    stopped = stop_head(_settings(args), keep_logs=not args.remove_logs)
    print("mlaas4hep is down" if stopped else "mlaas4hep was not running")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a bearer token from the built-in issuer."""
    from mlaas4hep.client import default_user
    from mlaas4hep.platform.issuer import builtin_issuer

    settings = _settings(args)
    if not settings.uses_builtin_issuer:
        print(
            "error: an external issuer is configured (MLAAS4HEP_OIDC_ISSUER); get a token from it",
            file=sys.stderr,
        )
        return 2
    issuer = builtin_issuer(settings)
    print(issuer.mint(args.user or default_user(), groups=args.group or [], ttl=args.ttl))
    return 0


def _load_spec_arg(args: argparse.Namespace):
    from mlaas4hep.platform.config import load_spec, spec_from_mlaas4hep_inputs

    if getattr(args, "files", None):
        if not args.params:
            raise SystemExit("error: --files needs --params (MLaaS4HEP's params.json)")
        return spec_from_mlaas4hep_inputs(
            args.files, args.labels, args.params, args.model, getattr(args, "preproc", None)
        )
    if not args.spec:
        raise SystemExit("error: give a SPEC file, or --files/--labels/--params/--model")
    return load_spec(args.spec)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a pipeline over HTTP; with --wait, follow it to the end."""
    from mlaas4hep.quickstart import print_progress

    spec = _load_spec_arg(args)
    with _closing(_client(args)) as client:
        record = client.submit(spec)
        print(f"submitted {record['id']} (model {record['name']!r})")
        if not args.wait:
            return 0
        final = client.wait(record["id"], on_update=print_progress)
    print(json.dumps(final, indent=2))
    return 0 if final["state"] == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _closing(_client(args)) as client:
        data = client.pipeline(args.id) if args.id else client.pipelines()
    print(json.dumps(data, indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _closing(_client(args)) as client:
        print(client.logs(args.id), end="")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Ask a served model for predictions (TFaaS /json)."""
    try:
        values = [float(v) for v in args.values]
    except ValueError as error:
        raise SystemExit(f"error: VALUES must be numbers: {error}") from None
    keys = args.keys.split(",") if args.keys else None
    with _closing(_client(args)) as client:
        print(json.dumps(client.predict(args.model, values, keys=keys)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a pipeline in this process as a Ray driver (the entrypoint of the Ray Job)."""
    import ray

    from mlaas4hep.platform.pipeline import run_pipeline
    from mlaas4hep.platform.runs import new_run_id
    from mlaas4hep.platform.storage import Storage

    settings = _settings(args)
    spec = _load_spec_arg(args) if not _is_storage_uri(args.spec) else _spec_from_uri(args.spec)
    owner = args.owner or _default_owner(settings)
    run_id = args.run_id or os.environ.get("MLAAS4HEP_RUN_ID") or new_run_id()
    address = os.environ.get("RAY_ADDRESS") or settings.ray_address or _local_head(settings)
    ray.init(address=address, log_to_driver=True)
    try:
        record = run_pipeline(spec, run_id, owner, Storage(settings.storage))
    finally:
        ray.shutdown()
    print(json.dumps(record, indent=2))
    return 0


def _is_storage_uri(value: str | None) -> bool:
    return bool(value) and "://" in value and not value.startswith("file://")


def _spec_from_uri(uri: str):
    import fsspec

    from mlaas4hep.platform.config import parse_spec, read_spec_text

    with fsspec.open(uri, "r") as stream:
        return parse_spec(read_spec_text(stream.read(), uri), uri)


def _local_head(settings: Settings) -> str | None:
    from mlaas4hep.platform.cluster import HeadState, head_is_running

    state = HeadState.load(settings)
    return state.gcs_address if head_is_running(state) else None


def _default_owner(settings: Settings) -> str:
    """Owner of pipelines started without one: the local user at the built-in issuer."""
    from mlaas4hep.client import default_user
    from mlaas4hep.platform.auth import owner_id

    issuer = settings.trusted_issuers[0]
    return owner_id(default_user(), issuer)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mlaas4hep.platform.demo import write_demo_data

    for path in write_demo_data(Path(args.dir), events=args.events, seed=args.seed):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo pipeline end to end over HTTP: data, submit, follow, predict."""
    from mlaas4hep.quickstart import predict_event, print_progress, write_demo_inputs

    settings = _settings(args)
    folder = Path(args.dir or Path(settings.home) / "demo")
    spec_path = write_demo_inputs(folder, events=args.events, epochs=args.epochs)
    print(f"demo data and spec in {folder}")
    from mlaas4hep.platform.config import load_spec

    spec = load_spec(spec_path)
    with _closing(_client(args)) as client:
        record = client.submit(spec)
        print(f"submitted pipeline {record['id']} as {record['owner']}")
        final = client.wait(record["id"], on_update=print_progress)
        if final["state"] != "SUCCEEDED":
            print(client.logs(record["id"])[-4000:], file=sys.stderr)
            print(f"pipeline {final['state']}: {final.get('message')}", file=sys.stderr)
            return 1
        model = final["model"]["name"]
        prediction, _ = predict_event(client, final["id"], model, folder / "signal.root", 0)
    print(f"model {model!r} version {final['model']['version']} registered and served")
    print(f"test AUC: {final['metrics'].get('test_auc', float('nan')):.4f}")
    print(f"prediction for event 0 of signal.root: {prediction}")
    print(
        f"dashboard: {settings.jobs_url}   (jobs: RAY_AUTH_MODE=token ray job list "
        f"--address {settings.jobs_url})"
    )
    return 0


def openapi_documents(settings: Settings) -> dict[str, dict]:
    """OpenAPI documents of the HTTP APIs, by file name, built without a cluster."""
    from mlaas4hep.serve.pipeline_api import ApiContext, create_pipeline_api
    from mlaas4hep.serve.tfaas import TFaaSOptions, TFaaSService, create_app

    api = create_pipeline_api(ApiContext.from_settings(settings))
    api.servers = [{"url": "/api/v1"}]
    inference = create_app(TFaaSService(settings, TFaaSOptions(), model_server=None))
    return {"pipeline-api.json": api.openapi(), "inference-api.json": inference.openapi()}


def cmd_openapi(args: argparse.Namespace) -> int:
    """Write the OpenAPI documents of the HTTP APIs into a folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, document in openapi_documents(_settings(args)).items():
        (out / name).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        print(out / name)
    return 0


class _closing:
    def __init__(self, client) -> None:
        self.client = client

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()


def _add_platform_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address of the HTTP API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port of the HTTP API (default 8000)")
    parser.add_argument("--storage", help="storage root URI (default ~/.mlaas4hep/storage)")


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="platform URL (default from MLAAS4HEP_PUBLIC_URL/host/port)")
    parser.add_argument(
        "--token", help="bearer token (default MLAAS4HEP_TOKEN, ~/.mlaas4hep/token)"
    )
    _add_platform_options(parser)


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="pipeline spec (YAML or JSON)")
    parser.add_argument("--files", help="MLaaS4HEP files.txt (instead of SPEC)")
    parser.add_argument("--labels", help="MLaaS4HEP labels.txt")
    parser.add_argument("--params", help="MLaaS4HEP params.json")
    parser.add_argument("--model", help="MLaaS4HEP model.py defining model(idim)")
    parser.add_argument("--preproc", help="MLaaS4HEP preproc.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlaas4hep", description="Machine Learning as a Service for HEP, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded platform")
    _add_platform_options(up)
    up.add_argument("--num-cpus", type=int, help="logical CPUs of the local head")
    up.add_argument("--dashboard-port", type=int)
    up.add_argument("--ray-port", type=int)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the embedded platform")
    down.add_argument("--remove-logs", action="store_true", help="also remove Ray's session logs")
    down.set_defaults(func=cmd_down)

    token = sub.add_parser("token", help="print a token from the built-in issuer")
    token.add_argument("--user", help="subject of the token (default: your user name)")
    token.add_argument("--group", action="append", help="group claim (repeatable)")
    token.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    _add_platform_options(token)
    token.set_defaults(func=cmd_token)

    submit = sub.add_parser("submit", help="submit a pipeline over HTTP")
    _add_spec_arguments(submit)
    _add_client_options(submit)
    submit.add_argument("--wait", action="store_true", help="follow the pipeline to its end")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="show one pipeline, or list yours")
    status.add_argument("id", nargs="?")
    _add_client_options(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="print a pipeline's log")
    logs.add_argument("id")
    _add_client_options(logs)
    logs.set_defaults(func=cmd_logs)

    predict = sub.add_parser("predict", help="predict with a served model (TFaaS /json)")
    predict.add_argument("model")
    predict.add_argument("values", nargs="+")
    predict.add_argument("--keys", help="comma-separated feature names")
    _add_client_options(predict)
    predict.set_defaults(func=cmd_predict)

    run = sub.add_parser("run", help="run a pipeline (the Ray Job entrypoint)")
    _add_spec_arguments(run)
    _add_platform_options(run)
    run.add_argument("--run-id", help="run id (default: a new one)")
    run.add_argument("--owner", help="owner recorded with the run and model")
    run.set_defaults(func=cmd_run)

    demo_data = sub.add_parser("demo-data", help="write demo signal/background ROOT files")
    demo_data.add_argument("dir")
    demo_data.add_argument("--events", type=int, default=4000)
    demo_data.add_argument("--seed", type=int, default=42)
    demo_data.set_defaults(func=cmd_demo_data)

    demo = sub.add_parser("demo", help="run the demo pipeline end to end over HTTP")
    demo.add_argument("--dir", help="folder for the demo data (default ~/.mlaas4hep/demo)")
    demo.add_argument("--events", type=int, default=4000)
    demo.add_argument("--epochs", type=int, default=5)
    _add_client_options(demo)
    demo.set_defaults(func=cmd_demo)

    openapi = sub.add_parser("openapi", help="write the OpenAPI documents of the HTTP APIs")
    openapi.add_argument("--out", default="docs/openapi", help="folder (default docs/openapi)")
    openapi.set_defaults(func=cmd_openapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlaas4hep.client import ClientError
    from mlaas4hep.platform.config import SpecError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ClientError, SpecError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
