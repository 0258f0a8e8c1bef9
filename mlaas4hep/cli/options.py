"""Options every ``mlaas4hep`` subcommand shares: the platform's settings and its HTTP client."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mlaas4hep.settings import Settings, load_settings

if TYPE_CHECKING:
    from mlaas4hep.cli.client import PlatformClient


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of the environment, with the platform options given on the command line."""
    overrides = {
        key: getattr(args, key, None)
        for key in (
            "host",
            "port",
            "grpc_port",
            "storage",
            "num_cpus",
            "dashboard_port",
            "ray_port",
        )
    }
    return load_settings(**overrides)


def client_of(args: argparse.Namespace) -> PlatformClient:
    """A client of the platform's HTTP API at ``--url`` with the caller's token."""
    from mlaas4hep.cli.client import PlatformClient, resolve_token

    settings = settings_of(args)
    url = getattr(args, "url", None) or settings.api_url
    return PlatformClient(url, resolve_token(settings, getattr(args, "token", None)))


def add_platform_options(parser: argparse.ArgumentParser) -> None:
    """Add --host, --port, --grpc-port and --storage to ``parser``."""
    parser.add_argument("--host", help="address of the HTTP API (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port of the HTTP API (default 8000)")
    parser.add_argument(
        "--grpc-port", type=int, help="port of the KServe v2 gRPC service (default 9000; 0: off)"
    )
    parser.add_argument("--storage", help="storage root URI (default ~/.mlaas4hep/storage)")


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add --url, --token and the platform options to ``parser``."""
    parser.add_argument("--url", help="platform URL (default from MLAAS4HEP_PUBLIC_URL/host/port)")
    parser.add_argument(
        "--token", help="bearer token (default MLAAS4HEP_TOKEN, ~/.mlaas4hep/token)"
    )
    add_platform_options(parser)
