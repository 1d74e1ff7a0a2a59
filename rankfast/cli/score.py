"""``rankfast score``: user ids in (one a line), JSON lines of top-K items and scores out."""

from __future__ import annotations

import contextlib
import json
import sys

from rankfast._io import atomic_file
from rankfast.cli import EXIT_USAGE, CLIError, add_command, positive_int

# numpy, tqdm and the Ranker (torch) load inside run_score, so that --help answers at once.


def read_users(lines, integer_ids: bool) -> list:
    """Raw user ids, one per non-blank line; integers when the model's ids are."""
    users = []
    for lineno, line in enumerate(lines, start=1):
        token = line.strip()
        if not token:
            continue
        if integer_ids:
            try:
                token = int(token)
            except ValueError:
                raise CLIError(
                    f"line {lineno}: user id {token!r} is not an integer (the model's user ids are)"
                ) from None
        users.append(token)
    return users


def run_score(args):
    import numpy as np
    from tqdm.auto import tqdm

    from rankfast.ranker import Ranker

    if args.explain and args.cold_start:
        raise CLIError("--explain: explains known users from their stored history; not with --cold-start", EXIT_USAGE)
    ranker = Ranker.load(args.model_dir, cold_start=args.cold_start)
    if args.explain and not hasattr(ranker.model, "history_weights"):
        raise CLIError(f"--explain: this {type(ranker.model).__name__} does not weigh history items", EXIT_USAGE)
    integer_ids = np.issubdtype(ranker.user_ids.raw.dtype, np.integer)
    with _open(args.input, "r", sys.stdin) as f:
        users = read_users(f, integer_ids)
    batches = range(0, len(users), args.batch_size)
    with _output(args.output) as out:
        for start in tqdm(batches, desc="score", unit="batch", disable=None, file=sys.stderr):
            for row in ranker.score(
                users[start : start + args.batch_size], k=args.k, exclude_seen=not args.include_seen
            ):
                if args.explain:
                    row["explanations"] = ranker.explain_items(row["user"], row["items"], top=args.explain)
                out.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def _output(path):
    """stdout, or ``path`` written atomically (:func:`rankfast._io.atomic_file`): it appears
    once every user is scored, so a failure (e.g. an unknown id in a later batch) leaves the
    old file or none, never part of the output."""
    if path in (None, "-"):
        yield sys.stdout
        return
    with atomic_file(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        yield f


@contextlib.contextmanager
def _open(path, mode, default):
    if path in (None, "-"):
        yield default
        return
    with open(path, mode, encoding="utf-8") as f:
        yield f


def add_parsers(sub):
    p = add_command(sub, "score")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--input", "-i", metavar="FILE", help="user ids, one a line (default: stdin)")
    p.add_argument("--output", "-o", metavar="FILE", help="JSON lines {user, items, scores} (default: stdout)")
    p.add_argument("-k", type=positive_int, default=10, help="items per user (default 10)")
    p.add_argument("--include-seen", action="store_true", help="keep each user's training items")
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="score unknown users from an empty history where the model can (else they are an error)",
    )
    p.add_argument(
        "--explain",
        type=positive_int,
        metavar="N",
        help="add each recommended item's N most weighed history items, "
        '"explanations": [[{"item", "weight"}, ...] per item] (attention models)',
    )
    p.add_argument("--batch-size", type=positive_int, default=1024, help="users per scoring call (default 1024)")
    p.set_defaults(run=run_score)
