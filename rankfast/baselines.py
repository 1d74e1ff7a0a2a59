"""Yardstick recommenders: popularity and EASE^R (Steck, 2019).

Both answer the calls :mod:`rankfast.evaluate` makes of a model:
``recommend(users, k, exclude=...)`` for full ranking and
``model(users, items)`` for aligned (user, item) pair scores.
"""

from __future__ import annotations

import numpy as np
import torch

from rankfast._ids import as_ids
from rankfast.data import Interactions
from rankfast.selection import topk

__all__ = ["Popularity", "EASE"]


class _Baseline:
    num_users: int
    num_items: int

    def score(self, users) -> torch.Tensor:
        """float32 scores ``[len(users), num_items]``."""
        raise NotImplementedError

    def _users(self, users) -> torch.Tensor:
        return as_ids("users", users, ndims=(0, 1), high=self.num_users).reshape(-1)

    def recommend(self, users, k: int, *, exclude=None):
        """Top-``k`` ``(item_ids, scores)`` per user, ``exclude`` as in :func:`rankfast.topk`."""
        values, ids = topk(self.score(users), k, exclude=exclude)
        return ids, values

    def __call__(self, users, items, history=None, lengths=None) -> torch.Tensor:
        """Scores of aligned ``(users[j], items[j])`` pairs (history is unused)."""
        users = self._users(users)
        items = as_ids("items", items, ndims=(0, 1), high=self.num_items).reshape(-1)
        if items.shape != users.shape:
            raise ValueError(f"items: shape {tuple(items.shape)} does not match users {tuple(users.shape)}")
        return self._pair_scores(users, items)

    def _pair_scores(self, users, items):
        return self.score(users).gather(1, items[:, None])[:, 0]


class Popularity(_Baseline):
    """Scores every item by its number of training interactions."""

    def __init__(self, train: Interactions):
        self.num_users, self.num_items = train.num_users, train.num_items
        self.counts = torch.from_numpy(train.item_counts().astype(np.float32))

    def score(self, users) -> torch.Tensor:
        return self.counts.expand(len(self._users(users)), -1).clone()

    def _pair_scores(self, users, items):
        return self.counts[items]


class EASE(_Baseline):
    """EASE^R: the item-item weights ``B = argmin |X - XB|^2 + lam |B|^2`` with
    ``diag(B) = 0``, in closed form on the binary user-item matrix ``X``.

    With at least as many users as items it solves the ``[items, items]``
    system and keeps ``B``. With fewer users it uses the equivalent dual form
    (Woodbury: ``X P = (XX^T + lam I)^-1 X``), an ``[users, users]`` solve,
    and keeps the training users' scores ``X B`` instead: the same numbers
    at a fraction of the cost when items outnumber users.

    ``history [users, items]``, optional: the rows ``B`` scores, in place of
    the binary training rows ``X`` (``B`` is still fitted on ``X``); e.g.
    :func:`rankfast.data.history_features` with a ``half_life``, so that
    recent items weigh more.
    """

    def __init__(self, train: Interactions, lam: float = 100.0, *, history: torch.Tensor | None = None):
        if not float(lam) > 0:
            raise ValueError(f"lam: must be positive, got {lam}")
        self.num_users, self.num_items = train.num_users, train.num_items
        self.lam = float(lam)
        x = torch.zeros(self.num_users, self.num_items, dtype=torch.float64)
        x[torch.from_numpy(train.users), torch.from_numpy(train.items)] = 1.0
        if history is not None:
            history = self._check_history(history)
        if self.num_items <= self.num_users:
            p = torch.cholesky_inverse(
                torch.linalg.cholesky(x.T @ x + self.lam * torch.eye(self.num_items, dtype=x.dtype))
            )
            weights = -p / torch.diagonal(p)
            weights.fill_diagonal_(0.0)
            if history is None:
                self.weights, self.user_scores = weights.float(), None
                self.indptr, self.indices = (torch.from_numpy(a) for a in train.user_items())
            else:  # the given rows are fixed, so keep their scores rather than the weights
                self.weights, self.user_scores = None, (history @ weights).float()
        else:
            m = torch.cholesky_inverse(
                torch.linalg.cholesky(x @ x.T + self.lam * torch.eye(self.num_users, dtype=x.dtype))
            )
            mx = m @ x  # = X P, with P = (X^T X + lam I)^-1
            p_diag = (1.0 - (mx * x).sum(dim=0)) / self.lam
            rows, rows_p = x, mx
            if history is not None:  # H P = (H - H X^T M X) / lam
                rows, rows_p = history, (history - (history @ x.T) @ mx) / self.lam
            self.user_scores = (rows - rows_p / p_diag).float()
            self.weights = None

    def _check_history(self, history) -> torch.Tensor:
        shape = (self.num_users, self.num_items)
        if not isinstance(history, torch.Tensor) or not history.is_floating_point():
            raise TypeError(f"history: expected a floating-point tensor of shape {shape}")
        if tuple(history.shape) != shape:
            raise ValueError(f"history: expected shape {shape}, got {tuple(history.shape)}")
        history = history.detach().cpu().double()
        if not bool(torch.isfinite(history).all()):
            raise ValueError("history: must be finite")
        return history

    def score(self, users) -> torch.Tensor:
        users = self._users(users)
        if self.user_scores is not None:
            return self.user_scores[users]
        return self._rows(users) @ self.weights

    def _pair_scores(self, users, items):
        if self.user_scores is not None:
            return self.user_scores[users, items]
        return (self._rows(users) * self.weights[:, items].T).sum(dim=1)

    def _rows(self, users):
        """Dense binary rows of X for ``users``, built from the CSR."""
        counts = self.indptr[users + 1] - self.indptr[users]
        rows = torch.repeat_interleave(torch.arange(len(users)), counts)
        starts = torch.repeat_interleave(self.indptr[users] - torch.cumsum(counts, 0) + counts, counts)
        cols = self.indices[starts + torch.arange(len(rows))]
        x = torch.zeros(len(users), self.num_items)
        x[rows, cols] = 1.0
        return x
