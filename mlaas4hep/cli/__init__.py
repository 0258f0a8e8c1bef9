"""The ``mlaas4hep`` command: subcommands, the HTTP client, the demo."""
