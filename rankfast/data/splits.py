"""Train/test splits. Each returns ``(train, test)`` sharing the id maps."""

from __future__ import annotations

import numpy as np

from rankfast.data.interactions import Interactions

__all__ = ["random_split", "temporal_split", "leave_last_out"]


def _check_ratio(test_ratio):
    if not 0.0 < float(test_ratio) < 1.0:
        raise ValueError(f"test_ratio: must lie in (0, 1), got {test_ratio}")


def random_split(data: Interactions, test_ratio: float = 0.2, *, seed: int = 0):
    """A uniformly random ``round(len(data) * test_ratio)`` interactions form the test set."""
    _check_ratio(test_ratio)
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_ratio))
    is_test = np.zeros(len(data), dtype=bool)
    is_test[order[:n_test]] = True
    return data.subset(~is_test), data.subset(is_test)


def _split_user_tails(data: Interactions, tail_sizes) -> tuple[Interactions, Interactions]:
    """Puts each user's last ``tail_sizes[user]`` interactions (by time, ties by item id) in test."""
    order = data.chronological_order()
    users = data.users[order]
    counts = np.bincount(users, minlength=data.num_users)
    ends = np.cumsum(counts)
    position_from_end = ends[users] - np.arange(len(order))  # 1 for a user's last interaction
    is_test = np.zeros(len(data), dtype=bool)
    is_test[order] = position_from_end <= tail_sizes[users]
    return data.subset(~is_test), data.subset(is_test)


def temporal_split(data: Interactions, test_ratio: float = 0.2):
    """Each user's last ``floor(n_u * test_ratio)`` interactions by timestamp
    (ties by item id) form the test set; no user's test precedes their train."""
    _check_ratio(test_ratio)
    counts = np.bincount(data.users, minlength=data.num_users)
    return _split_user_tails(data, np.floor(counts * float(test_ratio) + 1e-9).astype(np.int64))


def leave_last_out(data: Interactions, n: int = 1):
    """Each user's last ``n`` interactions form the test set; users with ``n``
    or fewer interactions stay entirely in train."""
    if int(n) < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    counts = np.bincount(data.users, minlength=data.num_users)
    return _split_user_tails(data, np.where(counts > n, int(n), 0))
