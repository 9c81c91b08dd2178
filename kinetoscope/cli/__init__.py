"""`kinetoscope` command line: one module per command group, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from kinetoscope.cli import common

COMMAND_MODULES = ("world", "judge", "autoencoder", "generate", "planner", "server")


def build_parser() -> argparse.ArgumentParser:
    parser = common.ErrorExitParser(prog="kinetoscope", description="Open, self-hosted text-to-video.")
    parser.add_argument("--version", action="version", version=f"kinetoscope {version('kinetoscope')}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=common.ErrorExitParser)
    for name in COMMAND_MODULES:
        module = __import__(f"kinetoscope.cli.{name}", fromlist=["register"])
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exit_request.code or 0)
    try:
        return int(args.handler(args) or 0)
    except common.UsageError as error:
        print(f"{args.command_prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
