"""How often history items repeat across users (a script, not a test).

The factorized DIN path runs the attention unit once per (candidate, distinct
history item) of a block of users when their history slots outnumber their
distinct items 1.5x or more. This prints that ratio for random blocks of users
of a real log: each user's last ``--length`` items, ``--users`` users a block.

    python bench/history_reuse.py [--data ml-latest-small] [--users 64] [--length 100]
"""

import argparse

import numpy as np

from rankfast import datasets
from rankfast.data import user_histories


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="ml-latest-small",
        help="a MovieLens name (read from $RANKFAST_DATA, downloaded there if missing) or directory",
    )
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    data = datasets.load(args.data)
    history, lengths = user_histories(data, args.length)
    rng = np.random.default_rng(0)
    for _ in range(args.draws):
        users = rng.choice(data.num_users, args.users, replace=False)
        slots = np.concatenate([history[u, : lengths[u]] for u in users])
        distinct = len(np.unique(slots))
        print(
            f"{args.users} users, last {args.length} items: {len(slots)} slots, {distinct} distinct items, "
            f"{len(slots) / distinct:.2f} slots per item"
        )


if __name__ == "__main__":
    main()
