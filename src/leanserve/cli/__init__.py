"""The ``leanserve`` command: a thin layer that parses arguments, calls the Python API and prints.

One module per command group registers its commands (``register(sub)``); this module assembles the
parser and turns every error a user can cause into one line on stderr and a non-zero exit, never a
traceback. Library warnings stay quiet unless ``-v``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leanserve.cli import (bench, edge, fairness, federate, k8s, learn, models, monitor, optimize, predict, serving,
                           traffic, tune, verbosity)
from leanserve.cli.args import Parser
from leanserve.errors import LeanserveError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
GROUPS = (models, predict, serving, traffic, monitor, optimize, bench, tune, edge, k8s, fairness, federate, learn)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity.configure(args.verbose, getattr(args, "command", None))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except LeanserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `leanserve inspect ... | head`: the reader left, nothing more to say
        _silence_stdout()
        return EXIT_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leanserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every leanserve command."""
    parser = Parser(
        prog="leanserve",
        description="Turn a trained model into a fast, monitored inference service.",
        epilog=(
            "a first session:\n"
            "  leanserve demo                       # train a digits CNN, import it into ./model-repo\n"
            "  leanserve list                       # what the repository holds\n"
            "  leanserve inspect digits-cnn         # signature, provenance, checksums\n"
            "  leanserve serve model-repo           # Open Inference Protocol over HTTP :8000 and gRPC :8001\n"
            "run 'leanserve COMMAND --help' for each command's options."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens, libraries' warnings included")
    parser.add_argument("--version", action="version", version=f"leanserve {_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
