"""The ``rankfast`` command line (also ``python -m rankfast``).

Exit codes, for scripts:

- 0: success;
- 1: the command failed: a missing or corrupted model directory, unreadable
  data, an unknown user id, failed benchmarks (one line on stderr);
- 2: bad arguments or a bad config file (one line on stderr);
- 3: an optional dependency the command needs is not installed;
- 130: interrupted (Ctrl-C).

An unexpected error (a bug) prints its traceback and exits with 1.
"""

from __future__ import annotations

import argparse
import sys

from rankfast.data import DataFormatError
from rankfast.ranker import ModelDirError

__all__ = ["main", "CLIError", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MISSING_DEPENDENCY"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_DEPENDENCY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CLIError(Exception):
    """A user mistake or an unmet condition: reported on one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def positive_int(text: str) -> int:
    """argparse ``type`` for counts (threads, batch sizes, k): a bad one is a usage error, exit 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from rankfast.cli import bench, info, score, workflow

    parser = _Parser(prog="rankfast", description="Fast ranking for recommender systems.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in (workflow, score, bench, info):
        module.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    """Runs one command; returns its exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
        return EXIT_OK
    except CLIError as err:
        return _fail(str(err), err.code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except (ModelDirError, DataFormatError, OSError, KeyError, ValueError) as err:
        # rankfast reports bad input with these, naming the argument or file.
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return _fail(message, EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"rankfast: error: {first}", file=sys.stderr)
    return code
