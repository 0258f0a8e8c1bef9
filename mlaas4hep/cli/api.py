"""``mlaas4hep`` subcommands for the rest of the HTTP API: pipelines, files, models and the
MLaaS4HEP server's endpoints. Registered by :func:`mlaas4hep.cli.main.build_parser`."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from mlaas4hep.cli.options import add_client_options, client_of


def _print(data: Any) -> None:
    if isinstance(data, str):
        print(data, end="" if data.endswith("\n") else "\n")
    else:
        print(json.dumps(data, indent=2))


def _write(data: bytes, out: str | None, default: str) -> None:
    path = Path(out or default)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data)} bytes)")


def cmd_whoami(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        _print(client.whoami())
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        _print(client.cancel(args.id))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        _print(client.delete(args.id))
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        for chunk in client.follow_logs(args.id):
            print(chunk, end="", flush=True)
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        if args.name is None:
            _print(client.artifacts(args.id))
        else:
            _write(client.artifact(args.id, args.name), args.out, Path(args.name).name)
    return 0


def cmd_submit_files(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else None
    with closing(client_of(args)) as client:
        record = client.submit_files(Path(args.spec), model, [Path(p) for p in args.data])
    _print(record)
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        if args.action == "ls":
            _print(client.files())
        elif args.action == "put":
            _print(client.upload_file(Path(args.path), args.target))
        elif args.action == "get":
            _write(client.download_file(args.path), args.out, Path(args.path).name)
        else:
            _print(client.delete_file(args.path))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with closing(client_of(args)) as client:
        if args.action == "ls":
            _print(client.registered_models(mine=args.mine))
        elif args.action == "show":
            _print(client.model_info(args.name))
        elif args.action == "bundle":
            version = f"-{args.version}" if args.version else ""
            _write(
                client.model_bundle(args.name, args.version),
                args.out,
                f"{args.name}{version}.tar.gz",
            )
        else:
            groups = args.groups.split(",") if args.groups else None
            _print(client.set_visibility(args.name, args.visibility, groups))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """The MLaaS4HEP server's endpoints, as its curl examples call them."""
    with closing(client_of(args)) as client:
        if args.endpoint == "upload":
            with open(args.tarball, "rb") as stream:
                files = {"file": (Path(args.tarball).name, stream, "application/gzip")}
                reply = client.server_call(
                    "POST", "upload", params={"name": args.name}, files=files
                )
        elif args.endpoint == "submit":
            reply = client.server_call(
                "POST", "submit", json=json.loads(Path(args.json).read_text())
            )
        elif args.endpoint in ("status_docker", "logs", "model"):
            reply = client.server_call("GET", args.endpoint, params={"process_name": args.name})
        else:
            reply = client.server_call("GET", args.endpoint, params={"name": args.name})
    if args.endpoint in ("logs", "model") and args.out:
        _write(reply.content, args.out, args.out)
    elif args.endpoint == "model":
        _write(reply.content, None, f"{args.name}.tar.gz")
    else:
        sys.stdout.write(reply.text if reply.text.endswith("\n") else reply.text + "\n")
    return 0


def add_api_commands(sub: argparse._SubParsersAction) -> None:
    """Register the subcommands of this module on the ``mlaas4hep`` parser."""

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        add_client_options(parser)
        parser.set_defaults(func=func)
        return parser

    command("whoami", cmd_whoami, "show the caller as the platform sees them")
    command("cancel", cmd_cancel, "cancel a pending or running pipeline").add_argument("id")
    command("delete", cmd_delete, "delete a finished pipeline and its artifacts").add_argument("id")
    command("follow", cmd_follow, "stream a pipeline's log until it finishes").add_argument("id")

    artifacts = command("artifacts", cmd_artifacts, "list a pipeline's artifacts, or fetch one")
    artifacts.add_argument("id")
    artifacts.add_argument("name", nargs="?", help="artifact to download, e.g. specs.json")
    artifacts.add_argument("-o", "--out", help="output file")

    upload = command("submit-files", cmd_submit_files, "submit with files (multipart upload)")
    upload.add_argument("spec", help="pipeline spec (YAML or JSON) naming data files by name")
    upload.add_argument("--model", help="model.py defining model(idim)")
    upload.add_argument("--data", nargs="*", default=[], help="data files sent with the spec")

    files = command("files", cmd_files, "your uploaded files: ls, put, get, rm")
    files.add_argument("action", choices=["ls", "put", "get", "rm"])
    files.add_argument("path", nargs="?", help="local file (put) or stored path (get, rm)")
    files.add_argument("target", nargs="?", help="stored path for put (default: file name)")
    files.add_argument("-o", "--out", help="output file for get")

    models = command("models", cmd_models, "registered models: ls, show, bundle, visibility")
    models.add_argument("action", choices=["ls", "show", "bundle", "visibility"])
    models.add_argument("name", nargs="?")
    models.add_argument("visibility", nargs="?", choices=["private", "group", "public"])
    models.add_argument("--groups", help="comma-separated groups for 'group' visibility")
    models.add_argument("--version", type=int, help="bundle version (default latest)")
    models.add_argument("--mine", action="store_true", help="ls: only your models")
    models.add_argument("-o", "--out", help="output file for bundle")

    server = command("server", cmd_server, "the MLaaS4HEP server's endpoints (/mlaas4hep)")
    server.add_argument(
        "endpoint",
        choices=[
            "upload",
            "submit",
            "status_docker",
            "logs",
            "model",
            "delete_specs",
            "delete_folder",
        ],
    )
    server.add_argument("name", nargs="?", help="folder name, or process name (luca_1)")
    server.add_argument("--tarball", help="upload: gzip tarball of the folder")
    server.add_argument("--json", help="submit: the submission JSON file")
    server.add_argument("-o", "--out", help="logs/model: output file")
