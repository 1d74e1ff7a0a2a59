"""Ranking and rating metrics on numpy arrays.

Top-K metrics take ``ranked``, an int ``[users, K']`` array of item ids best
first (``-1`` is padding, as :func:`rankfast.topk` returns), and
``relevant``, each row's relevant items: a list of id sequences or CSR
``(indptr, indices)``. They return one value per row (NaN for a row with no
relevant item), so callers can average or slice. Conventions:

* Recall@K divides the hits by ``min(|relevant|, K)``, so a perfect list scores 1;
* NDCG@K uses binary gains and ``1 / log2(rank + 2)`` discounts (rank from 0),
  normalised by the ideal list of ``min(|relevant|, K)`` hits;
* AP@K averages precision at each hit over ``min(|relevant|, K)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "hit_rate",
    "recall",
    "precision",
    "ndcg",
    "reciprocal_rank",
    "average_precision",
    "ranking_metrics",
    "sampled_ranks",
    "rank_metrics",
    "auc",
    "gauc",
    "mae",
    "mse",
    "rmse",
    "accuracy",
    "log_loss",
    "cross_entropy",
]


def _array(x, name, dtype=None):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _ranked(ranked, k):
    ranked = _array(ranked, "ranked")
    if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked: expected a 2-D integer array, got shape {ranked.shape} of {ranked.dtype}")
    if k is None:
        return ranked.astype(np.int64)
    if int(k) < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    if ranked.shape[1] < int(k):
        raise ValueError(f"k: {k} exceeds the {ranked.shape[1]} items ranked per row")
    return ranked[:, : int(k)].astype(np.int64)


def _relevant_csr(relevant, rows):
    if isinstance(relevant, tuple) and len(relevant) == 2:
        indptr, indices = _array(relevant[0], "relevant", np.int64), _array(relevant[1], "relevant", np.int64)
    else:
        if len(relevant) != rows:
            raise ValueError(f"relevant: {len(relevant)} rows for {rows} ranked rows")
        lists = [_array(r, "relevant", np.int64).reshape(-1) for r in relevant]
        indptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum([len(r) for r in lists], out=indptr[1:])
        indices = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    if len(indptr) != rows + 1:
        raise ValueError(f"relevant: CSR indptr has {len(indptr)} entries for {rows} ranked rows")
    return indptr, indices


def _hits(ranked, relevant):
    """``hits [rows, K]`` (distinct relevant items in the list) and ``|relevant|`` per row."""
    rows = ranked.shape[0]
    indptr, indices = _relevant_csr(relevant, rows)
    width = int(max(ranked.max(initial=0), indices.max(initial=0))) + 1
    owners = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    keys = np.unique(owners * width + indices)
    n_relevant = np.bincount(keys // width, minlength=rows)
    ranked_keys = np.arange(rows, dtype=np.int64)[:, None] * width + ranked
    hits = np.isin(ranked_keys, keys) & (ranked >= 0)
    # A repeated id in a list counts once.
    first = np.ones_like(hits)
    if ranked.shape[1] > 1:
        order = np.argsort(ranked, axis=1, kind="stable")
        sorted_ids = np.take_along_axis(ranked, order, axis=1)
        repeat = np.zeros_like(hits)
        repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
        np.put_along_axis(first, order, ~repeat, axis=1)
    return hits & first, n_relevant


def _per_row(values, n_relevant):
    return np.where(n_relevant > 0, values, np.nan)


def hit_rate(ranked, relevant, k):
    """1 where the top ``k`` hold at least one relevant item, else 0."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    return _per_row(hits.any(axis=1).astype(np.float64), n_rel)


def recall(ranked, relevant, k):
    """Relevant items in the top ``k`` over ``min(|relevant|, k)``."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _per_row(hits.sum(axis=1) / np.minimum(n_rel, int(k)), n_rel)


def precision(ranked, relevant, k):
    """Relevant items in the top ``k`` over ``k``."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    return _per_row(hits.sum(axis=1) / int(k), n_rel)


def _discounts(k):
    return 1.0 / np.log2(np.arange(k) + 2.0)


def ndcg(ranked, relevant, k):
    """Binary-gain NDCG of the top ``k``."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    discounts = _discounts(int(k))
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, int(k))]
    with np.errstate(invalid="ignore", divide="ignore"):
        return _per_row((hits * discounts).sum(axis=1) / ideal, n_rel)


def reciprocal_rank(ranked, relevant, k=None):
    """``1 / (position of the first relevant item + 1)`` within the top ``k``
    (default: the whole list), 0 without a hit."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    first = hits.argmax(axis=1)
    return _per_row(np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0), n_rel)


def average_precision(ranked, relevant, k):
    """AP@k: mean of precision@i over the hits, divided by ``min(|relevant|, k)``."""
    hits, n_rel = _hits(_ranked(ranked, k), relevant)
    precision_at = np.cumsum(hits, axis=1) / np.arange(1.0, int(k) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _per_row((precision_at * hits).sum(axis=1) / np.minimum(n_rel, int(k)), n_rel)


_TOPK_METRICS = {"hr": hit_rate, "recall": recall, "precision": precision, "ndcg": ndcg, "map": average_precision}


def ranking_metrics(ranked, relevant, ks=(10, 20)) -> dict[str, float]:
    """Means over rows with relevant items of HR, Recall, Precision, NDCG and
    MAP at each ``k`` in ``ks``, and MRR over the whole list: keys like
    ``"recall@20"`` and ``"mrr"``."""
    ranked = _ranked(ranked, None)
    out = {}
    for k in ks:
        for name, fn in _TOPK_METRICS.items():
            out[f"{name}@{k}"] = float(np.nanmean(fn(ranked, relevant, k)))
    out["mrr"] = float(np.nanmean(reciprocal_rank(ranked, relevant)))
    return out


# --- sampled ranking ----------------------------------------------------------------


def sampled_ranks(target_scores, negative_scores, valid=None) -> np.ndarray:
    """Each target's 0-based rank among its sampled negatives.

    Only negatives scored strictly above the target count (ties favour the
    target); NaN ranks below every number. ``valid`` (bool, like
    ``negative_scores``) masks out negatives to drop, e.g. those equal to
    the target item.
    """
    target = _array(target_scores, "target_scores", np.float64).reshape(-1)
    negatives = _array(negative_scores, "negative_scores", np.float64)
    if negatives.ndim != 2 or negatives.shape[0] != len(target):
        raise ValueError(f"negative_scores: expected shape ({len(target)}, n), got {negatives.shape}")
    t = target[:, None]
    above = (negatives > t) | (np.isnan(t) & ~np.isnan(negatives))
    if valid is not None:
        valid = _array(valid, "valid", bool)
        if valid.shape != negatives.shape:
            raise ValueError(f"valid: shape {valid.shape} does not match negative_scores {negatives.shape}")
        above &= valid
    return above.sum(axis=1)


def rank_metrics(ranks, ks=(10, 20), num_negatives=None) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of single-target ranks (from :func:`sampled_ranks`);
    with ``num_negatives`` (per row, after dropping) also the sampled AUC."""
    ranks = _array(ranks, "ranks", np.float64).reshape(-1)
    out = {}
    for k in ks:
        inside = ranks < int(k)
        out[f"hr@{k}"] = float(inside.mean())
        out[f"ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    if num_negatives is not None:
        n = _array(num_negatives, "num_negatives", np.float64).reshape(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["auc"] = float(np.nanmean((n - ranks) / n))
    return out


# --- pointwise metrics --------------------------------------------------------------


def _pair(pred, target, name_pred="predictions", name_target="targets"):
    pred = _array(pred, name_pred, np.float64).reshape(-1)
    target = _array(target, name_target, np.float64).reshape(-1)
    if len(pred) != len(target):
        raise ValueError(f"{name_target}: length {len(target)} does not match {name_pred} ({len(pred)})")
    if not len(pred):
        raise ValueError(f"{name_pred}: empty")
    return pred, target


def _average_ranks(x):
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(x)]])
    ranks = np.empty(len(x))
    ranks[order] = ((first + last + 1) / 2.0)[group]
    return ranks


def auc(scores, labels) -> float:
    """ROC AUC: the chance a random positive outscores a random negative (ties 1/2).
    NaN when ``labels`` hold a single class."""
    scores, labels = _pair(scores, labels, "scores", "labels")
    positive = labels > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(scores, labels, groups) -> float:
    """Group AUC: per-group (per-user) AUC averaged with weights equal to the
    group's size, over groups holding both classes."""
    scores, labels = _pair(scores, labels, "scores", "labels")
    groups = _array(groups, "groups").reshape(-1)
    if len(groups) != len(scores):
        raise ValueError(f"groups: length {len(groups)} does not match scores ({len(scores)})")
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.concatenate([[True], groups[order][1:] != groups[order][:-1], [True]]))
    total, weight = 0.0, 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[start:end]
        value = auc(scores[rows], labels[rows])
        if not np.isnan(value):
            total += value * len(rows)
            weight += len(rows)
    return total / weight if weight else float("nan")


def mae(predictions, targets) -> float:
    """Mean absolute error."""
    pred, target = _pair(predictions, targets)
    return float(np.abs(pred - target).mean())


def mse(predictions, targets) -> float:
    """Mean squared error."""
    pred, target = _pair(predictions, targets)
    return float(((pred - target) ** 2).mean())


def rmse(predictions, targets) -> float:
    """Root mean squared error."""
    pred, target = _pair(predictions, targets)
    return float(np.sqrt(((pred - target) ** 2).mean()))


def accuracy(predictions, labels, threshold=0.5) -> float:
    """Share of predictions on the right side of ``threshold`` (use 0.0 for logits)."""
    pred, target = _pair(predictions, labels, "predictions", "labels")
    return float(((pred >= threshold) == (target > 0.5)).mean())


def log_loss(logits, labels) -> float:
    """Binary log-loss (cross-entropy) of logits against 0/1 labels, in nats per row:
    ``-mean(y log p + (1 - y) log(1 - p))`` with ``p = sigmoid(logit)``, computed
    from the logits (no clipping)."""
    z, y = _pair(logits, labels, "logits", "labels")
    # log(1 + exp(-|z|)) + max(z, 0) - y z  ==  -y log p - (1 - y) log(1 - p)
    return float((np.logaddexp(0.0, -np.abs(z)) + np.maximum(z, 0.0) - y * z).mean())


def cross_entropy(logits, targets) -> float:
    """Multi-class log-loss: ``-mean(log softmax(logits)[target])`` of logits ``[n, C]``
    against class indices ``[n]``."""
    logits = _array(logits, "logits", np.float64)
    targets = _array(targets, "targets").reshape(-1)
    if logits.ndim != 2 or len(logits) != len(targets) or not len(targets):
        raise ValueError(f"logits: expected [n, C] with n = {len(targets)} targets, got shape {logits.shape}")
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets: expected class indices in [0, {logits.shape[1]})")
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_norm - logits[np.arange(len(targets)), targets]).mean())
