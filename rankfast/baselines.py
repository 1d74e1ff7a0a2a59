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

__all__ = ["ALS", "EASE", "Popularity", "als_half_step"]


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


#: An ALS half step solves exactly (:func:`als_half_step` with ``cg_steps=None``) when the
#: other side has at most this many rows, and by conjugate gradient otherwise.
ALS_EXACT_MAX = 4096


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
    for all items given the users (:func:`als_half_step`, vectorised over rows
    in torch on the CPU, float32). A side is solved exactly when the other
    side has at most :data:`ALS_EXACT_MAX` rows (through that side's
    ``[rows, rows]`` Gram matrix: on MovieLens' few hundred users, the item
    step), otherwise by ``cg_steps`` steps of conjugate gradient from the
    previous factors, as the implicit library does. Factors start uniform in
    ``[0, 0.01)`` from ``seed``.
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
        by_user = (indptr, items)
        by_item = _transpose(indptr, items, self.num_items)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.rand(self.num_users, self.factors, generator=gen) * 0.01
        y = torch.rand(self.num_items, self.factors, generator=gen) * 0.01
        user_steps = None if self.num_items <= ALS_EXACT_MAX else int(cg_steps)
        item_steps = None if self.num_users <= ALS_EXACT_MAX else int(cg_steps)
        for _ in range(int(iterations)):
            als_half_step(x, y, *by_user, self.reg, self.alpha, user_steps)
            als_half_step(y, x, *by_item, self.reg, self.alpha, item_steps)
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


def als_half_step(
    x: torch.Tensor,
    y: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    reg: float,
    alpha: float,
    cg_steps: int | None,
) -> torch.Tensor:
    """One half step of implicit-feedback ALS, in place on ``x [n, f]``: each row
    ``x_r`` is set to (``cg_steps=None``), or moved toward by ``cg_steps`` steps
    of conjugate gradient from its current value,
    ``argmin_x sum_j c_rj (p_rj - x . y_j)^2 + reg |x|^2`` over all rows ``j``
    of ``y [m, f]``, where ``p_rj = 1`` and ``c_rj = 1 + alpha`` for the
    columns ``indices[indptr[r]:indptr[r + 1]]`` of row ``r`` (CSR, int64) and
    ``p_rj = 0``, ``c_rj = 1`` elsewhere: the solution of
    ``(G + alpha Y_r^T Y_r) x_r = (1 + alpha) Y_r^T 1`` with
    ``G = Y^T Y + reg I`` and ``Y_r`` the rows of ``y`` in row ``r``.

    The exact solve goes through the ``[m, m]`` matrix ``Q = Y G^-1 Y^T``
    (Woodbury: ``x_r = (1 + alpha) (Y G^-1)_r^T (I + alpha Q_rr)^-1 1``, with
    ``Q_rr`` the block of row ``r``'s columns), so it suits a small ``m``; it
    needs ``reg > 0`` or a full-rank ``y``. Returns ``x``.
    """
    n, f = x.shape
    gram = y.T @ y + reg * torch.eye(f, dtype=y.dtype)
    if cg_steps is None:
        return _exact_half_step(x, y, indptr, indices, gram, alpha)
    with warnings.catch_warnings():  # torch calls sparse CSR support beta
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(indptr, indices, torch.ones(len(indices), dtype=x.dtype), (n, len(y)))

    def apply(v):  # the systems' matrices times the rows of v: v G + alpha Y_r^T (Y_r v_r)
        overlap = torch.sparse.sampled_addmm(pattern, v, y.T, beta=0.0)  # v_r . y_j on the pattern
        return v @ gram + alpha * (overlap @ y)

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


def _exact_half_step(x, y, indptr, indices, gram, alpha):
    """:func:`als_half_step`'s exact solve, rows batched by their count of columns rounded
    up to a power of two (padding slots are decoupled identity rows)."""
    z = torch.linalg.solve(gram, y.T).T  # Y G^-1, [m, f]
    q = y @ z.T  # [m, m]
    counts = torch.diff(indptr)
    x.zero_()  # rows without columns: the solution is 0
    size, largest = 1, int(counts.max()) if len(counts) else 0
    while size // 2 < largest:  # rows with (size / 2, size] columns
        rows = torch.nonzero((counts > size // 2) & (counts <= size)).squeeze(1)
        if len(rows):
            slot = torch.arange(size)
            valid = slot < counts[rows, None]  # [R, size]
            cols = indices[(indptr[rows, None] + slot).clamp(max=len(indices) - 1)].masked_fill(~valid, 0)
            pair = valid[:, :, None] & valid[:, None, :]
            system = (alpha * q[cols[:, :, None], cols[:, None, :]]).masked_fill(~pair, 0.0)
            system.diagonal(dim1=1, dim2=2).add_(1.0)
            weights = torch.cholesky_solve(valid[:, :, None].to(q.dtype), torch.linalg.cholesky(system))[:, :, 0]
            x[rows] = (1.0 + alpha) * torch.einsum("rs,rsf->rf", weights * valid, z[cols])
        size *= 2
    return x
