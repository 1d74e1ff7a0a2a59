"""Negative sampling, leakage-free user histories and history features."""

from __future__ import annotations

import math

import numpy as np
import torch

from rankfast._ids import as_ids
from rankfast.data.interactions import Interactions

__all__ = ["NegativeSampler", "event_histories", "user_histories", "history_features", "sequence_windows"]


class NegativeSampler:
    """Draws items a user never interacted with in ``data``.

    ``distribution="uniform"`` draws every item alike; ``"popularity"`` draws
    item ``i`` with probability proportional to ``count_i ** alpha`` (items
    never seen in ``data`` are then never drawn). Draws that hit one of the
    user's positives are redrawn, so a positive is never returned.
    """

    def __init__(self, data: Interactions, *, distribution: str = "uniform", alpha: float = 0.75):
        if distribution not in ("uniform", "popularity"):
            raise ValueError(f"distribution: expected 'uniform' or 'popularity', got {distribution!r}")
        self.num_items = data.num_items
        self.indptr, self.positives = data.user_items()
        self._keys = (
            np.repeat(np.arange(data.num_users, dtype=np.int64), np.diff(self.indptr)) * self.num_items + self.positives
        )
        if distribution == "uniform":
            weights = np.ones(self.num_items)
        else:
            weights = data.item_counts().astype(np.float64) ** float(alpha)
            weights[data.item_counts() == 0] = 0.0
        self.probs = weights / weights.sum()
        self._cdf = np.cumsum(self.probs)
        self._cdf[-1] = 1.0
        # Mass left to each user once their positives are removed: zero means
        # there is nothing to draw for that user.
        owners = self._keys // self.num_items
        self._free_mass = 1.0 - np.bincount(owners, weights=self.probs[self.positives], minlength=data.num_users)

    def log_prob(self, items) -> np.ndarray:
        """``log q(item)`` of the proposal distribution (for logQ correction)."""
        with np.errstate(divide="ignore"):
            return np.log(self.probs[np.asarray(items)])

    def is_positive(self, users, items) -> np.ndarray:
        """Whether each ``(user, item)`` pair is an interaction of ``data``."""
        keys = np.asarray(users, dtype=np.int64) * self.num_items + np.asarray(items, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        return self._keys[pos] == keys if len(self._keys) else np.zeros(keys.shape, dtype=bool)

    def sample(self, users, n: int, rng: np.random.Generator) -> np.ndarray:
        """``[len(users), n]`` int64 negatives for each user (with replacement)."""
        users = as_ids("users", users, ndims=(0, 1), high=len(self._free_mass), device="cpu").reshape(-1).numpy()
        if int(n) < 0:
            raise ValueError(f"n: must be non-negative, got {n}")
        starved = users[self._free_mass[users] <= 1e-12]
        if starved.size:
            raise ValueError(f"users: user {int(starved[0])} has no item left to sample as a negative")
        out = np.empty((len(users), int(n)), dtype=np.int64)
        todo = np.arange(out.size)
        row_users = np.repeat(users, int(n))
        while todo.size:
            draws = np.searchsorted(self._cdf, rng.random(todo.size), side="right")
            draws = np.minimum(draws, self.num_items - 1)
            out.reshape(-1)[todo] = draws
            todo = todo[self.is_positive(row_users[todo], draws)]
        return out


def _padded_windows(items, starts, ends, max_len):
    """Rows ``items[max(start, end - max_len):end]``, left-aligned, zero-padded."""
    lengths = np.minimum(ends - starts, max_len)
    cols = np.arange(max_len)
    index = (ends - lengths)[:, None] + cols
    valid = cols < lengths[:, None]
    history = np.where(valid, items[np.minimum(index, max(len(items) - 1, 0))] if len(items) else 0, 0)
    return history.astype(np.int64), lengths.astype(np.int64)


def _check_max_len(max_len):
    if int(max_len) < 1:
        raise ValueError(f"max_len: must be at least 1, got {max_len}")
    return int(max_len)


def event_histories(data: Interactions, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each interaction, the user's last ``max_len`` items strictly before it.

    Order is by timestamp, ties by item id (as in the splits). Returns
    ``history [len(data), max_len]`` (oldest first, zero-padded on the
    right) and ``lengths [len(data)]``, aligned with ``data``'s rows.
    """
    max_len = _check_max_len(max_len)
    order = data.chronological_order()
    users = data.users[order]
    first = np.searchsorted(users, users, side="left")
    history, lengths = _padded_windows(data.items[order], first, np.arange(len(order)), max_len)
    out_h, out_l = np.empty_like(history), np.empty_like(lengths)
    out_h[order], out_l[order] = history, lengths
    return out_h, out_l


def user_histories(data: Interactions, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's last ``max_len`` items of ``data`` (e.g. the training split),
    as ``history [num_users, max_len]`` and ``lengths [num_users]``; the
    history to score that user's future with."""
    max_len = _check_max_len(max_len)
    order = data.chronological_order()
    counts = np.bincount(data.users, minlength=data.num_users)
    ends = np.cumsum(counts)
    return _padded_windows(data.items[order], ends - counts, ends, max_len)


def sequence_windows(data: Interactions, max_len: int) -> tuple[np.ndarray, ...]:
    """Each user's items cut into windows for next-item training of a causal
    sequence model (:class:`rankfast.models.SASRec`): one pass over a window
    gives the user vector before each of its items at once.

    A user's items in time order (ties by item id, as in
    :func:`event_histories`) ``x_0 .. x_{n-1}`` give windows
    ``x[kS : kS + max_len]`` for ``k = 0, 1, ...``, stride
    ``S = max(1, max_len // 2)``. Every interaction but a user's first (which
    has no history) is the target of exactly one window position: ``x_e`` of
    position ``e - 1 - kS`` in the latest-starting window that holds
    ``x_{e-1}``, so its history is ``x[kS : e]``: all earlier items for the
    first ``max_len`` of a user's events, and more than ``max_len - S`` of
    them for later ones.

    Returns ``windows [W, max_len]`` (item ids, zero-padded on the right),
    ``lengths [W]``, ``targets [W, max_len]`` (the item each position
    predicts, -1 where none), ``users [W]`` and ``events [W, max_len]`` (the
    row of ``data`` of each target, -1 where none), all int64.
    """
    max_len = _check_max_len(max_len)
    stride = max(1, max_len // 2)
    order = data.chronological_order()
    items = data.items[order]
    counts = np.bincount(data.users, minlength=data.num_users)
    firsts = np.cumsum(counts) - counts
    # Window k of a user with n items holds positions up to kS + max_len - 1; the last event
    # (e = n - 1) needs k = ceil((e - max_len) / S) at most. Users with one item have no target.
    per_user = np.where(counts >= 2, np.maximum(0, -(-(counts - 1 - max_len) // stride)) + 1, 0)
    users = np.repeat(np.arange(data.num_users, dtype=np.int64), per_user)
    k = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    start = k * stride  # within the user's items
    n = counts[users]
    lengths = np.minimum(max_len, n - start)
    cols = np.arange(max_len)
    local = start[:, None] + cols  # item index within the user of each window slot
    glob = np.minimum(firsts[users][:, None] + local, max(len(items) - 1, 0))
    windows = np.where(cols < lengths[:, None], items[glob] if len(items) else 0, 0)
    event = local + 1  # the event each position predicts
    owner = np.maximum(0, -(-(event - max_len) // stride))  # the window k each event belongs to
    assigned = (event <= n[:, None] - 1) & (owner == k[:, None])
    target_glob = np.minimum(firsts[users][:, None] + event, max(len(items) - 1, 0))
    targets = np.where(assigned, items[target_glob] if len(items) else 0, -1)
    events = np.where(assigned, order[target_glob] if len(items) else 0, -1)
    as64 = (a.astype(np.int64) for a in (windows, lengths, targets, users, events))
    return tuple(as64)


def history_features(data: Interactions, *, half_life: float | None = None, floor: float = 0.0) -> torch.Tensor:
    """Each user's items in ``data`` as a dense row: ``[num_users, num_items]``
    float32, each row L2-normalised (a user without items gets a zero row).

    These are the user features of an item-based user tower, e.g.
    ``DotModel(DotConfig(..., user_feature_dim=num_items), user_features=...)``:
    the user vector is the history through a learned item-to-vector matrix.

    Without ``half_life`` every item weighs 1. With it, the user's items are
    taken in time order (ties by item id, as in the splits) and the ``j``-th
    most recent one (``j = 0`` for the last) weighs
    ``floor + (1 - floor) * 0.5 ** (j / half_life)``, so the row leans to what
    the user did last; an item the user has several times keeps its most
    recent weight. Dense: meant for catalogues that fit a ``[users, items]``
    float32 matrix.
    """
    if half_life is not None and not (math.isfinite(half_life) and half_life > 0):
        raise ValueError(f"half_life: must be a positive number of interactions or None, got {half_life}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor: must lie in [0, 1], got {floor}")
    if half_life is None and floor:
        raise ValueError("floor: weighs items by recency, so it needs a half_life")
    rows = np.zeros((data.num_users, data.num_items), dtype=np.float32)
    if half_life is None:
        rows[data.users, data.items] = 1.0
    else:
        order = data.chronological_order()
        users, items = data.users[order], data.items[order]
        ends = np.cumsum(np.bincount(users, minlength=data.num_users))
        steps_back = ends[users] - 1 - np.arange(len(users))
        weights = floor + (1.0 - floor) * 0.5 ** (steps_back / half_life)
        np.maximum.at(rows, (users, items), weights.astype(np.float32))
    return torch.nn.functional.normalize(torch.from_numpy(rows), dim=1)
