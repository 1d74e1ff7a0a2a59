"""Yardstick recommenders: popularity, EASE^R (Steck, 2019) and implicit-feedback
ALS (Hu, Koren and Volinsky, 2008).

All answer the calls :mod:`rankfast.evaluate` makes of a model:
``recommend(users, k, exclude=...)`` for full ranking and
``model(users, items)`` for aligned (user, item) pair scores.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rankfast._ids import as_ids
from rankfast.data import Interactions
from rankfast.selection import topk

__all__ = ["ALS", "EASE", "Popularity", "als_half_step", "ease_weights", "training_pattern"]


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
        self.num_users, self.num_items = train.num_users, train.num_items
        self.lam = _check_lam(lam)
        x = _binary_rows(train)
        if history is not None:
            history = self._check_history(history)
        if self.num_items <= self.num_users:
            weights = _primal_weights(x, self.lam)
            if history is None:
                self.weights, self.user_scores = weights.float(), None
                self.indptr, self.indices = (torch.from_numpy(a) for a in train.user_items())
            else:  # the given rows are fixed, so keep their scores rather than the weights
                self.weights, self.user_scores = None, (history @ weights).float()
        else:
            mx, p_diag = _dual(x, self.lam)
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


def ease_weights(train: Interactions, lam: float = 100.0) -> torch.Tensor:
    """EASE^R's item-item weights ``B [num_items, num_items]`` (float32, zero diagonal), fitted
    on the binary rows of ``train`` as :class:`EASE` fits them (``scores = rows @ B``): e.g.
    the starting point of a :class:`rankfast.models.ItemItem`.

    :class:`EASE` keeps only the users' scores when users are fewer than items; here the
    whole matrix is formed (``num_items ** 2`` floats, float64 while it is computed), from
    the dual form then: ``B_ij = (X^T M X)_ij / (lam P_jj)`` off the diagonal.
    """
    lam = _check_lam(lam)
    x = _binary_rows(train)
    if train.num_items <= train.num_users:
        return _primal_weights(x, lam).float()
    mx, p_diag = _dual(x, lam)
    b = (x.T @ mx).div_(lam * p_diag)
    return b.fill_diagonal_(0.0).float()


def _check_lam(lam) -> float:
    if not float(lam) > 0:
        raise ValueError(f"lam: must be positive, got {lam}")
    return float(lam)


def _binary_rows(train: Interactions) -> torch.Tensor:
    """The binary user-item matrix ``X [users, items]``, float64."""
    x = torch.zeros(train.num_users, train.num_items, dtype=torch.float64)
    x[torch.from_numpy(train.users), torch.from_numpy(train.items)] = 1.0
    return x


def _primal_weights(x: torch.Tensor, lam: float) -> torch.Tensor:
    """EASE^R's ``B = -P / diag(P)`` with a zero diagonal, ``P = (X^T X + lam I)^-1``: an ``[items, items]`` solve."""
    p = torch.cholesky_inverse(torch.linalg.cholesky(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype)))
    return (-p / torch.diagonal(p)).fill_diagonal_(0.0)


def _dual(x: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X P, diag(P))`` through the ``[users, users]`` solve ``M = (X X^T + lam I)^-1`` (Woodbury:
    ``P = (I - X^T M X) / lam``), for when users are fewer than items."""
    m = torch.cholesky_inverse(torch.linalg.cholesky(x @ x.T + lam * torch.eye(x.shape[0], dtype=x.dtype)))
    mx = m @ x  # = X P
    return mx, (1.0 - (mx * x).sum(dim=0)) / lam


class ALS(_Baseline):
    """Implicit-feedback matrix factorization by alternating least squares (Hu,
    Koren and Volinsky, 2008): user factors ``X [users, factors]`` and item
    factors ``Y [items, factors]`` minimising
    ``sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2)`` over every
    (user, item) cell, where ``p_ui`` is 1 for a (user, item) pair of the
    training data and 0 elsewhere, and the confidence ``c_ui`` is
    ``1 + alpha`` on those pairs and 1 elsewhere. A user's score of an item is
    ``x_u . y_i``.

    Each of ``iterations`` rounds solves for all users given the items, then
    for all items given the users (:func:`als_half_step`): ``cg_steps`` steps
    of conjugate gradient from the previous factors, as the implicit library
    does, vectorised over rows in torch on the CPU (float32, sparse products
    over the training pairs). Factors start uniform in ``[0, 0.01)`` from
    ``seed``.
    """

    def __init__(
        self,
        train: Interactions,
        factors: int = 64,
        *,
        reg: float = 0.01,
        alpha: float = 1.0,
        iterations: int = 15,
        cg_steps: int = 3,
        seed: int = 0,
    ):
        for name, value in (("factors", factors), ("iterations", iterations), ("cg_steps", cg_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not float(reg) >= 0:
            raise ValueError(f"reg: must be non-negative, got {reg}")
        if not float(alpha) >= 0:
            raise ValueError(f"alpha: must be non-negative, got {alpha}")
        self.num_users, self.num_items = train.num_users, train.num_items
        self.factors, self.reg, self.alpha = int(factors), float(reg), float(alpha)
        indptr, items = (torch.from_numpy(a.astype(np.int64)) for a in train.user_items())
        by_user = training_pattern(indptr, items, self.num_items)
        by_item = training_pattern(*_transpose(indptr, items, self.num_items), self.num_users)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.rand(self.num_users, self.factors, generator=gen) * 0.01
        y = torch.rand(self.num_items, self.factors, generator=gen) * 0.01
        for _ in range(int(iterations)):
            als_half_step(x, y, by_user, self.reg, self.alpha, int(cg_steps))
            als_half_step(y, x, by_item, self.reg, self.alpha, int(cg_steps))
        self.user_factors, self.item_factors = x, y

    def score(self, users) -> torch.Tensor:
        return self.user_factors[self._users(users)] @ self.item_factors.T

    def _pair_scores(self, users, items):
        return (self.user_factors[users] * self.item_factors[items]).sum(dim=1)


def _transpose(indptr: torch.Tensor, indices: torch.Tensor, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR structure of the transposed pattern (columns sorted within rows)."""
    rows = torch.repeat_interleave(torch.arange(len(indptr) - 1), torch.diff(indptr))
    order = torch.argsort(indices * (len(indptr) - 1) + rows)
    counts = torch.bincount(indices, minlength=num_cols)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]), rows[order]


def training_pattern(
    indptr: torch.Tensor, indices: torch.Tensor, num_cols: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The 0/1 matrix ``[len(indptr) - 1, num_cols]`` with ones at the CSR structure
    ``(indptr, indices)`` (int64, columns distinct within a row), as a sparse CSR tensor."""
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta
        warnings.simplefilter("ignore", UserWarning)
        shape = (len(indptr) - 1, num_cols)
        return torch.sparse_csr_tensor(indptr, indices, torch.ones(len(indices), dtype=dtype), shape)


def als_half_step(
    x: torch.Tensor, y: torch.Tensor, pattern: torch.Tensor, reg: float, alpha: float, cg_steps: int
) -> torch.Tensor:
    """One half step of implicit-feedback ALS, in place on ``x [n, f]``: each row
    ``x_r`` moves toward ``argmin_x sum_j c_rj (p_rj - x . y_j)^2 + reg |x|^2``
    over all rows ``j`` of ``y [m, f]`` by ``cg_steps`` steps of conjugate
    gradient from its current value, where ``p_rj = 1`` and
    ``c_rj = 1 + alpha`` where ``pattern [n, m]`` (:func:`training_pattern`)
    has a one and ``p_rj = 0``, ``c_rj = 1`` elsewhere. That is the linear
    system ``(Y^T Y + reg I + alpha Y_r^T Y_r) x_r = (1 + alpha) Y_r^T 1``
    (``Y_r`` the rows of ``y`` in row ``r`` of the pattern), solved for every
    row at once without forming it; with ``cg_steps >= f`` the solution is
    exact up to rounding. Returns ``x``.
    """
    f = x.shape[1]
    gram = y.T @ y + reg * torch.eye(f, dtype=y.dtype)

    def apply(v):  # the systems' matrices times the rows of v: v (Y^T Y + reg I) + alpha Y_r^T (Y_r v_r)
        out = v @ gram
        if alpha:
            overlap = torch.sparse.sampled_addmm(pattern, v, y.T, beta=0.0)  # v_r . y_j on the pattern
            out += alpha * (overlap @ y)
        return out

    r = (1.0 + alpha) * (pattern @ y) - apply(x)
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(int(cg_steps)):
        ap = apply(p)
        curvature = (p * ap).sum(1)
        step = torch.where(curvature > 0, rs / curvature.clamp(min=tiny), 0.0)
        x += step[:, None] * p
        r -= step[:, None] * ap
        rs_new = (r * r).sum(1)
        p = r + torch.where(rs > 0, rs_new / rs.clamp(min=tiny), 0.0)[:, None] * p
        rs = rs_new
    return x
