"""The ``mlaas4hep`` command.

Platform: ``up``, ``down``, ``token``. Clients of the HTTP API: ``submit``, ``status``,
``logs``, ``resume``, ``predict``, ``demo``. Pipeline and data: ``run`` (the Ray Job's entrypoint),
``specs``, ``flatten``, ``demo-data``, ``predict-files`` (batch scoring of ROOT files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from mlaas4hep.cli.options import add_client_options, add_platform_options, client_of, settings_of
from mlaas4hep.settings import Settings

if TYPE_CHECKING:
    from mlaas4hep.spec import PipelineSpec
    from mlaas4hep.store.storage import Storage

# Read by Ray and TensorFlow when first imported, so set before any command imports them:
# Ray's token authentication is always on, and Ray Train needs legacy Keras.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the embedded default: local Ray head, Serve apps, built-in issuer, storage."""
    import ray

    from mlaas4hep.platform.cluster import (
        HeadState,
        connect,
        head_is_running,
        port_open,
        ray_env,
        start_head,
    )
    from mlaas4hep.serve.apps.deploy import deploy
    from mlaas4hep.store.storage import Storage

    settings = settings_of(args)
    Storage(settings.storage)
    for key, value in ray_env().items():
        os.environ.setdefault(key, value)
    os.environ["RAY_AUTH_MODE"] = "token"
    grpc = settings.grpc_address
    grpc_taken = grpc is not None and port_open(grpc.rsplit(":", 1)[0], settings.grpc_port)
    if grpc_taken and not head_is_running(HeadState.load(settings)):
        # The ingress replicas share the port (SO_REUSEPORT): another server there would
        # silently get part of the connections.
        print(
            f"mlaas4hep up: gRPC port {settings.grpc_port} is taken by another process: "
            "set MLAAS4HEP_GRPC_PORT (or --grpc-port; 0 turns gRPC off)",
            file=sys.stderr,
        )
        return 1
    head = start_head(settings)
    if port_open(settings.host if settings.host != "0.0.0.0" else "127.0.0.1", settings.port):
        print(f"(port {settings.port} answers already; redeploying the applications)")
    if settings.uses_builtin_issuer:
        from mlaas4hep.auth.issuer import builtin_issuer

        builtin_issuer(settings)  # creates the signing key before any replica reads it
    connect(head.gcs_address, log_to_driver=False, logging_level="ERROR")
    try:
        names = deploy(settings)
    finally:
        ray.shutdown()
    print(f"mlaas4hep is up ({', '.join(names)})")
    print(f"  API:        {settings.api_url}/api/v1   (docs: {settings.api_url}/api/v1/docs)")
    print(f"  TFaaS:      {settings.api_url}/json, /models, /v2/...")
    if settings.grpc_address:
        print(f"  KServe gRPC: {settings.grpc_address}   (tritonclient.grpc, bearer token)")
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

    stopped = stop_head(settings_of(args), keep_logs=not args.remove_logs)
    print("mlaas4hep is down" if stopped else "mlaas4hep was not running")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    """Save an access token to ~/.mlaas4hep/token: from a variable, a file, or the issuer's
    device authorization grant."""
    from mlaas4hep.cli.client import ClientError, device_login, save_token

    settings = settings_of(args)
    try:
        if args.from_env:
            token = os.environ.get(args.from_env, "")
            if not token.strip():
                raise ClientError(f"environment variable {args.from_env} is empty or unset")
        elif args.from_file:
            token = Path(args.from_file).expanduser().read_text()
        else:
            issuer = args.issuer or (settings.oidc_issuer or [None])[0]
            if not issuer or not args.client_id:
                raise ClientError(
                    "device login needs --issuer (or MLAAS4HEP_OIDC_ISSUER) and --client-id"
                )

            def show(answer: dict) -> None:
                where = answer.get("verification_uri_complete") or answer.get("verification_uri")
                print(f"open {where} and enter the code {answer.get('user_code')}", flush=True)

            token = device_login(
                issuer, args.client_id, args.client_secret, args.scope, show, resource=args.resource
            )
        path = save_token(settings, token)
    except (ClientError, OSError) as error:
        print(f"mlaas4hep login: {error}", file=sys.stderr)
        return 1
    print(f"token saved to {path}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a bearer token from the built-in issuer."""
    from mlaas4hep.auth.issuer import builtin_issuer
    from mlaas4hep.cli.client import default_user

    settings = settings_of(args)
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
    from mlaas4hep.spec import (
        MODEL_NAME_PATTERN,
        load_spec,
        spec_from_mlaas4hep_inputs,
    )

    if getattr(args, "files", None):
        if not args.params:
            raise SystemExit("error: --files needs --params (MLaaS4HEP's params.json)")
        spec = spec_from_mlaas4hep_inputs(
            args.files, args.labels, args.params, args.model, getattr(args, "preproc", None)
        )
        if getattr(args, "name", None):
            if not re.match(MODEL_NAME_PATTERN, args.name):
                raise SystemExit(f"error: --name {args.name!r}: use letters, digits and _.- (64)")
            spec.name = args.name
        return spec
    if not args.spec:
        raise SystemExit("error: give a SPEC file, or --files/--labels/--params/--model")
    return load_spec(args.spec)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a pipeline over HTTP; with --wait, follow it to the end."""
    from mlaas4hep.cli.quickstart import print_progress

    spec = _load_spec_arg(args)
    with closing(client_of(args)) as client:
        record = client.submit(spec)
        print(f"submitted {record['id']} (model {record['name']!r})")
        if not args.wait:
            return 0
        final = client.wait(record["id"], on_update=print_progress)
    print(json.dumps(final, indent=2))
    return 0 if final["state"] == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        data = client.pipeline(args.id) if args.id else client.pipelines()
    print(json.dumps(data, indent=2))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        print(client.logs(args.id), end="")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume a cancelled or failed pipeline from its latest checkpoint; --wait follows it."""
    with closing(client_of(args)) as client:
        record = client.resume(args.id)
        print(f"resumed {record['id']} as job {record.get('job_id')}")
        return _follow(client, record["id"]) if args.wait else 0


def _follow(client, run_id: str) -> int:
    """Print a pipeline's progress until it ends; exit code 0 when it succeeded."""
    from mlaas4hep.cli.quickstart import print_progress

    final = client.wait(run_id, on_update=print_progress)
    print(json.dumps(final, indent=2))
    return 0 if final["state"] == "SUCCEEDED" else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """Ask a served model for predictions (TFaaS /json)."""
    try:
        values = [float(v) for v in args.values]
    except ValueError as error:
        raise SystemExit(f"error: VALUES must be numbers: {error}") from None
    keys = args.keys.split(",") if args.keys else None
    with closing(client_of(args)) as client:
        print(json.dumps(client.predict(args.model, values, keys=keys)))
    return 0


def cmd_predict_files(args: argparse.Namespace) -> int:
    """Score ROOT files with a model bundle on Ray Data actors; write Parquet to --out."""
    from mlaas4hep.bundle import BundleError
    from mlaas4hep.data.datasets import error_message
    from mlaas4hep.data.errors import DataError
    from mlaas4hep.serve.batch_predict import predict_files
    from mlaas4hep.store.registry import RegistryError
    from mlaas4hep.store.storage import Storage

    try:
        with _ray_session(args):
            result = predict_files(
                args.model,
                args.files,
                args.out,
                storage=Storage(settings_of(args).storage),
                tree=args.tree,
                identifiers=[n for v in args.identifier or [] for n in v.split(",") if n],
                actors=args.actors,
            )
    except (BundleError, RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except DataError as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 1
    print(f"wrote {result.events} scored events to {result.out_dir}: {', '.join(result.columns)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a pipeline in this process as a Ray driver (the entrypoint of the Ray Job)."""
    import contextlib

    from mlaas4hep.data.errors import DataError
    from mlaas4hep.data.rootio import load_xrootd_client

    with contextlib.suppress(DataError):  # without the client, root:// reads say so later
        load_xrootd_client()  # before anything loads TensorFlow (see load_xrootd_client)
    import ray

    from mlaas4hep.pipeline.orchestrator import run_pipeline
    from mlaas4hep.store.runs import new_run_id
    from mlaas4hep.store.storage import Storage

    settings = settings_of(args)
    spec = _load_spec_arg(args) if not _is_storage_uri(args.spec) else _spec_from_uri(args.spec)
    owner = args.owner or _default_owner(settings)
    run_id = args.run_id or os.environ.get("MLAAS4HEP_RUN_ID") or new_run_id()
    storage = Storage(settings.storage)
    spec = _confined_if_submitted(spec, settings, storage, run_id)
    _ray_init(_cluster_address(settings), log_to_driver=True)
    try:
        record = run_pipeline(spec, run_id, owner, storage)
    except Exception as error:  # logged, and recorded as the run's message
        print(f"error: run {run_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(json.dumps(record, indent=2))
    return 0


def _confined_if_submitted(
    spec: PipelineSpec, settings: Settings, storage: Storage, run_id: str
) -> PipelineSpec:
    """The spec of a run submitted over HTTP checked again by the data-access policy of
    this job's settings, with its paths resolved (a trusted local run is returned as it is).

    A refused path fails the run with the policy's message (:class:`DataAccessError`).
    """
    from mlaas4hep.data.access import DataAccessError, DataAccessPolicy
    from mlaas4hep.store.runs import RunState, RunStore

    runs = RunStore(storage)
    try:
        record = runs.get(run_id)
    except LookupError:
        return spec  # `mlaas4hep run SPEC` or `ray job submit` by the machine's operator
    if record.get("source") == "cli":
        return spec
    try:
        policy = DataAccessPolicy.from_settings(settings, storage)
        return policy.check_spec(spec, record["owner"], run_id)
    except DataAccessError as error:
        runs.update(run_id, state=RunState.FAILED, message=str(error))
        raise


def _is_storage_uri(value: str | None) -> bool:
    return bool(value) and "://" in value and not value.startswith("file://")


def _spec_from_uri(uri: str):
    import fsspec

    from mlaas4hep.spec import parse_spec, read_spec_text

    with fsspec.open(uri, "r") as stream:
        return parse_spec(read_spec_text(stream.read(), uri), uri)


def _local_head(settings: Settings) -> str | None:
    from mlaas4hep.platform.cluster import HeadState, head_is_running

    state = HeadState.load(settings)
    return state.gcs_address if head_is_running(state) else None


def _default_owner(settings: Settings) -> str:
    """Owner of pipelines started without one: the local user at the built-in issuer."""
    from mlaas4hep.auth.oidc import owner_id
    from mlaas4hep.cli.client import default_user

    issuer = settings.trusted_issuers[0]
    return owner_id(default_user(), issuer)


def _cluster_address(settings: Settings) -> str | None:
    """The Ray cluster a command joins: ``RAY_ADDRESS``, the settings', or the running
    local head; None when there is none."""
    return os.environ.get("RAY_ADDRESS") or settings.ray_address or _local_head(settings)


def _ray_address(args: argparse.Namespace) -> str | None:
    """:func:`_cluster_address` of the command's settings."""
    return _cluster_address(settings_of(args))


def _ray_connected() -> bool:
    """True when this process is already a Ray driver (without importing Ray)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _ray_init(address: str | None, **init_kwargs) -> None:
    """``ray.init`` at ``address``, or of a local Ray when it is None (with the token file
    created first: a local Ray started here uses token authentication too)."""
    import ray

    if not address:
        from mlaas4hep.auth.ray_token import ensure_ray_token

        ensure_ray_token()
    ray.init(address=address, **init_kwargs)


class _ray_session:
    """Connect to the local platform head if it runs (else start a light local Ray: no
    dashboard, one CPU per core); disconnect after.

    Does nothing when this process is already connected.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = False
        self.levels: dict[str, int] = {}

    def __enter__(self) -> None:
        import logging

        from mlaas4hep.data.execution import usable_cores
        from mlaas4hep.platform.cluster import ray_env

        # Before Ray is imported: it reads its authentication mode once, at import.
        for key, value in ray_env().items():
            os.environ.setdefault(key, value)
        import ray

        # Errors are printed once, as `error: ...`; Ray's own copies stay in its logs.
        for name in ("ray.data", "ray.exceptions"):
            self.levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if ray.is_initialized():
            return
        address = _ray_address(self.args)
        # A command's own Ray: the dashboard's processes would only take start-up time.
        local = {} if address else {"include_dashboard": False, "num_cpus": usable_cores()}
        _ray_init(address, log_to_driver=False, logging_level="ERROR", **local)
        self.started = True
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False

    def __exit__(self, *exc) -> None:
        import logging

        import ray

        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if self.started:
            ray.shutdown()


def _data_command(args: argparse.Namespace, action) -> int:
    """Check the spec's inputs, choose where to run, then run ``action(spec, summary,
    execution)``: in forked local processes, or on a Ray session.

    Prints the execution chosen and why. Data errors print ``error: ...`` naming the file,
    branch or field, and give 1.
    """
    from mlaas4hep.data.datasets import choose_execution, error_message
    from mlaas4hep.data.errors import DataError
    from mlaas4hep.data.rootio import inspect_inputs

    spec = _load_spec_arg(args)
    try:
        summary = inspect_inputs(spec)  # fails fast, before any Ray process starts
        requested = getattr(args, "execution", "auto")
        execution = choose_execution(spec, summary, requested, _ray_address(args), _ray_connected())
        print(execution.describe(), flush=True)
        if execution.kind == "local":
            action(spec, summary, execution)
        else:
            with _ray_session(args):
                action(spec, summary, execution)
    except DataError as error:
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    """Compute the specs of a spec's inputs into --out (reused when the inputs are unchanged)."""
    from mlaas4hep.data.datasets import obtain_specs, write_json

    def action(spec, summary, execution) -> None:
        reuse = None if args.force else args.out
        result = obtain_specs(spec, summary, reuse=reuse, pipeline="cli", execution=execution)
        print(f"{args.out}: {result.why}" if result.reused else f"recomputing: {result.why}")
        write_json(result.document, args.out)
        print(result.describe())
        print(f"wrote {args.out}")

    return _data_command(args, action)


def cmd_flatten(args: argparse.Namespace) -> int:
    """Flatten a spec's events into Parquet under --out, with the specs.json it used."""
    from mlaas4hep.data.datasets import EVENTS_DIR, flatten_to_parquet

    def action(spec, summary, execution) -> None:
        result = flatten_to_parquet(
            spec, args.out, args.specs, summary, pipeline="cli", execution=execution
        )
        specs = result.specs
        print(f"{'reused' if specs.reused else 'computed'} specs: {specs.why}")
        print(specs.describe())
        print(
            f"wrote {result.events} events x {result.n_features} features to "
            f"{Path(args.out) / EVENTS_DIR} (Parquet), specs.json and features.json"
        )

    return _data_command(args, action)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mlaas4hep.cli.demo import write_demo_data

    for path in write_demo_data(Path(args.dir), events=args.events, seed=args.seed):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo pipeline end to end over HTTP: data, submit, follow, predict."""
    from mlaas4hep.cli.quickstart import predict_event, print_progress, write_demo_inputs

    settings = settings_of(args)
    folder = Path(args.dir or Path(settings.home) / "demo")
    spec_path = write_demo_inputs(folder, events=args.events, epochs=args.epochs)
    print(f"demo data and spec in {folder}")
    from mlaas4hep.spec import load_spec

    spec = load_spec(spec_path)
    with closing(client_of(args)) as client:
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
    from mlaas4hep.serve.apps.context import ApiContext
    from mlaas4hep.serve.apps.inference import create_app
    from mlaas4hep.serve.apps.pipeline_api import create_pipeline_api
    from mlaas4hep.serve.dataplane import DataPlane, TFaaSOptions

    api = create_pipeline_api(ApiContext.from_settings(settings))
    api.servers = [{"url": "/api/v1"}]
    inference = create_app(DataPlane(settings, TFaaSOptions(), model_server=None))
    from mlaas4hep.serve.apps.mlaas4hep_server import create_mlaas4hep_server_api

    server = create_mlaas4hep_server_api(ApiContext.from_settings(settings))
    server.servers = [{"url": "/mlaas4hep"}]
    return {
        "pipeline-api.json": api.openapi(),
        "inference-api.json": inference.openapi(),
        "mlaas4hep-server-api.json": server.openapi(),
    }


def cmd_openapi(args: argparse.Namespace) -> int:
    """Write the OpenAPI documents of the HTTP APIs into a folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, document in openapi_documents(settings_of(args)).items():
        (out / name).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        print(out / name)
    return 0


def cmd_serve_config(args: argparse.Namespace) -> int:
    """Print or write the Serve config of the platform's applications (YAML)."""
    from mlaas4hep.platform.k8s import ManifestError, embed_serve_config, serve_config_yaml

    text = serve_config_yaml(settings_of(args), kubernetes=args.kubernetes)
    if args.manifest:
        try:
            embed_serve_config(Path(args.manifest), text)
        except ManifestError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(args.manifest)
    if args.out:
        Path(args.out).write_text(text)
        print(args.out)
    if not (args.out or args.manifest):
        sys.stdout.write(text)
    return 0


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="pipeline spec (YAML or JSON)")
    parser.add_argument("--files", help="MLaaS4HEP files.txt (instead of SPEC)")
    parser.add_argument("--labels", help="MLaaS4HEP labels.txt")
    parser.add_argument("--params", help="MLaaS4HEP params.json")
    parser.add_argument("--model", help="MLaaS4HEP model.py defining model(idim)")
    parser.add_argument("--preproc", help="MLaaS4HEP preproc.json")
    parser.add_argument("--name", help="model name to register, with --files (default: model)")


def _add_execution_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--execution",
        choices=("auto", "local", "ray"),
        default="auto",
        help="where to run: local processes, Ray, or auto (default: local for local files, "
        "Ray when the inputs need it: remote files, global shuffle, read resources)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlaas4hep", description="Machine Learning as a Service for HEP, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded platform")
    add_platform_options(up)
    up.add_argument("--num-cpus", type=int, help="logical CPUs of the local head")
    up.add_argument("--dashboard-port", type=int)
    up.add_argument("--ray-port", type=int)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the embedded platform")
    down.add_argument("--remove-logs", action="store_true", help="also remove Ray's session logs")
    down.set_defaults(func=cmd_down)

    login = sub.add_parser("login", help="save an access token for the CLI (~/.mlaas4hep/token)")
    login.add_argument("--issuer", help="OIDC issuer for the device grant (default: configured)")
    login.add_argument("--client-id", help="OAuth2 client id registered at the issuer")
    login.add_argument("--client-secret", help="client secret, for confidential clients")
    login.add_argument("--scope", default="openid mlaas4hep.submit", help="scopes to ask for")
    login.add_argument("--resource", help="RFC 8707 resource indicator, if the issuer needs one")
    login.add_argument("--from-env", metavar="VAR", help="take the token from this variable")
    login.add_argument("--from-file", metavar="PATH", help="take the token from this file")
    add_platform_options(login)
    login.set_defaults(func=cmd_login)

    token = sub.add_parser("token", help="print a token from the built-in issuer")
    token.add_argument("--user", help="subject of the token (default: your user name)")
    token.add_argument("--group", action="append", help="group claim (repeatable)")
    token.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    add_platform_options(token)
    token.set_defaults(func=cmd_token)

    submit = sub.add_parser("submit", help="submit a pipeline over HTTP")
    _add_spec_arguments(submit)
    add_client_options(submit)
    submit.add_argument("--wait", action="store_true", help="follow the pipeline to its end")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="show one pipeline, or list yours")
    status.add_argument("id", nargs="?")
    add_client_options(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="print a pipeline's log")
    logs.add_argument("id")
    add_client_options(logs)
    logs.set_defaults(func=cmd_logs)

    resume = sub.add_parser("resume", help="resume a cancelled or failed pipeline")
    resume.add_argument("id")
    resume.add_argument("--wait", action="store_true", help="follow the pipeline to its end")
    add_client_options(resume)
    resume.set_defaults(func=cmd_resume)

    predict = sub.add_parser("predict", help="predict with a served model (TFaaS /json)")
    predict.add_argument("model")
    predict.add_argument("values", nargs="+")
    predict.add_argument("--keys", help="comma-separated feature names")
    add_client_options(predict)
    predict.set_defaults(func=cmd_predict)

    predict_files = sub.add_parser(
        "predict-files", help="score ROOT files with a model into Parquet (Ray Data)"
    )
    predict_files.add_argument("model", help="model name[/versions/N] or a bundle folder")
    predict_files.add_argument("files", nargs="+", help="ROOT files (local, root:// or fsspec URL)")
    predict_files.add_argument("--out", required=True, help="output folder (Parquet)")
    predict_files.add_argument("--tree", default="Events", help="TTree path (default Events)")
    predict_files.add_argument(
        "--identifier", action="append", help="identifier branches to keep, e.g. run,event"
    )
    predict_files.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    add_platform_options(predict_files)
    predict_files.set_defaults(func=cmd_predict_files)

    run = sub.add_parser("run", help="run a pipeline (the Ray Job entrypoint)")
    _add_spec_arguments(run)
    add_platform_options(run)
    run.add_argument("--run-id", help="run id (default: a new one)")
    run.add_argument("--owner", help="owner recorded with the run and model")
    run.set_defaults(func=cmd_run)

    specs = sub.add_parser("specs", help="compute the specs (jdim, min, max) of a spec's inputs")
    _add_spec_arguments(specs)
    add_platform_options(specs)
    specs.add_argument("--out", default="specs.json", help="specs file (default specs.json)")
    specs.add_argument("--force", action="store_true", help="recompute even if --out is valid")
    _add_execution_option(specs)
    specs.set_defaults(func=cmd_specs)

    flatten = sub.add_parser("flatten", help="flatten a spec's events into Parquet")
    _add_spec_arguments(flatten)
    add_platform_options(flatten)
    flatten.add_argument("--out", required=True, help="output folder")
    flatten.add_argument("--specs", help="specs file to reuse if computed from the same inputs")
    _add_execution_option(flatten)
    flatten.set_defaults(func=cmd_flatten)

    demo_data = sub.add_parser("demo-data", help="write demo signal/background ROOT files")
    demo_data.add_argument("dir")
    demo_data.add_argument("--events", type=int, default=4000)
    demo_data.add_argument("--seed", type=int, default=42)
    demo_data.set_defaults(func=cmd_demo_data)

    demo = sub.add_parser("demo", help="run the demo pipeline end to end over HTTP")
    demo.add_argument("--dir", help="folder for the demo data (default ~/.mlaas4hep/demo)")
    demo.add_argument("--events", type=int, default=4000)
    demo.add_argument("--epochs", type=int, default=5)
    add_client_options(demo)
    demo.set_defaults(func=cmd_demo)

    from mlaas4hep.cli.api import add_api_commands

    add_api_commands(sub)

    openapi = sub.add_parser("openapi", help="write the OpenAPI documents of the HTTP APIs")
    openapi.add_argument("--out", default="docs/openapi", help="folder (default docs/openapi)")
    openapi.set_defaults(func=cmd_openapi)

    serve_cfg = sub.add_parser(
        "serve-config", help="print the Serve config of the applications (serveConfigV2)"
    )
    serve_cfg.add_argument("--out", help="write it to this file instead of printing it")
    serve_cfg.add_argument(
        "--kubernetes",
        action="store_true",
        help="the cluster's config: settings from the pods' environment, external issuer",
    )
    serve_cfg.add_argument(
        "--manifest", help="update the serveConfigV2 block of this RayService manifest"
    )
    add_platform_options(serve_cfg)
    serve_cfg.set_defaults(func=cmd_serve_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlaas4hep.cli.client import ClientError
    from mlaas4hep.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ClientError, SpecError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
