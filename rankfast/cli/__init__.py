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
import importlib
import logging
import sys
from typing import NamedTuple

from rankfast import __version__

__all__ = ["main", "build_parser", "CLIError", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MISSING_DEPENDENCY"]

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


class Command(NamedTuple):
    module: str  # under rankfast.cli; its add_parsers(sub) defines the command and its run function
    summary: str  # the line in `rankfast --help`


#: Every command. Only the module of the command being run is imported, so
#: `rankfast --help`, a command's --help and argument errors answer without
#: loading torch (the modules import heavy things inside their run functions).
COMMANDS = {
    "demo": Command("workflow", "generate data, train, compare with popularity and EASE^R, save, recommend"),
    "train": Command("workflow", "train a model and write its model directory"),
    "evaluate": Command("workflow", "full-ranking metrics of a model directory on its held-out split"),
    "score": Command("score", "top-K items for user ids, as JSON lines"),
    "bench": Command("bench", "run the benchmark suites, print the comparison table, draw a chart"),
    "info": Command("info", "versions, devices, active backends"),
}


def add_command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """Adds command ``name`` to the subparsers ``sub`` with its summary from :data:`COMMANDS`."""
    return sub.add_parser(name, help=COMMANDS[name].summary, **kwargs)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` only the module of the command it names is
    imported (the other commands are listed, not defined), else every one."""
    parser = _Parser(prog="rankfast", description="Fast ranking for recommender systems.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    modules = dict.fromkeys(c.module for name, c in COMMANDS.items() if chosen is None or name == chosen)
    for module in modules:
        importlib.import_module(f"rankfast.cli.{module}").add_parsers(sub)
    for name, command in COMMANDS.items():
        if command.module not in modules:
            add_command(sub, name)  # listed in --help; never parsed, since it is not the command given
    return parser


class _StderrLines(logging.Handler):
    """rankfast's INFO log lines (e.g. one per training epoch) on the current ``sys.stderr``,
    so a command whose output goes to a file or pipe still reports progress."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's rule: a failing handler must not raise
            self.handleError(record)


def _log_to_stderr():
    logger = logging.getLogger("rankfast")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    """Runs one command; returns its exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _log_to_stderr()
    try:
        args = build_parser(argv).parse_args(argv)
        args.run(args)
        return EXIT_OK
    except CLIError as err:
        return _fail(str(err), err.code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except (OSError, KeyError, ValueError) as err:
        # rankfast reports bad input with these (ModelDirError and DataFormatError are
        # ValueErrors, DownloadError an OSError), naming the argument or file.
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return _fail(message, EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).split())  # one line, whatever the exception held
    print(f"rankfast: error: {first}", file=sys.stderr)
    return code
