"""Evaluation protocols: full ranking, sampled ranking and pointwise.

A ``model`` is either a rankfast model (``rankfast.models``), scored through
:func:`rankfast.score`, or any object with ``recommend(users, k, exclude=)``
and ``model(users, items)`` pair scores; the baselines of
:mod:`rankfast.baselines` also give whole rows, ``score(users)``, which the
sampled protocol gathers its candidates from.
Models that read a user history (``model.uses_history``, the attention
model) get each user's last ``max_history`` items of ``train``. A model
whose forward returns a tuple (:class:`rankfast.train.MultiTask`) is read
through its click logits, or its ratings for ``task="rating"``. Models that
read context fields (``model.uses_context``) get each pair's context from the
evaluated data; in full ranking a user's request context is that of the user's
first test interaction.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from rankfast import metrics
from rankfast._ids import as_ids
from rankfast.data import Interactions, NegativeSampler, user_histories
from rankfast.models import RankingModel
from rankfast.scoring import score

__all__ = ["evaluate", "evaluate_sampled", "evaluate_pointwise"]


@contextlib.contextmanager
def _inference(model):
    """``torch.no_grad`` and eval mode, restoring the training flag after."""
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


class _Histories:
    """Per-user histories from ``train`` for models that need them (else ``None``s)."""

    def __init__(self, model, train: Interactions, max_history: int):
        if not getattr(model, "uses_history", False):
            self.history = self.lengths = None
        else:
            history, lengths = user_histories(train, max_history)
            self.history, self.lengths = torch.from_numpy(history), torch.from_numpy(lengths)

    def __call__(self, users: torch.Tensor):
        if self.history is None:
            return None, None
        return self.history[users], self.lengths[users]


def _check_same_space(train, other, name):
    if train.user_ids != other.user_ids or train.item_ids != other.item_ids:
        raise ValueError(f"{name}: must share train's id maps (split one Interactions, or pass user_ids/item_ids)")


def _check_batch_size(batch_size):
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    return int(batch_size)


def _rows(indptr, indices, users):
    return [indices[indptr[u] : indptr[u + 1]] for u in users]


def evaluate(
    model,
    train: Interactions,
    test: Interactions,
    *,
    ks=(10, 20),
    batch_size: int = 1024,
    max_history: int = 50,
    progress: bool = True,
):
    """Full ranking: each test user's items ranked against all items, the
    user's training items excluded; HR/Recall/Precision/NDCG/MAP@K and MRR
    (over the top ``max(ks)``), averaged over users with test items.

    Users are scored ``batch_size`` at a time, so no users x items matrix
    exists beyond one batch.
    """
    _check_same_space(train, test, "test")
    batch_size = _check_batch_size(batch_size)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected positive cut-offs, got {ks}")
    k = max(ks)
    users = np.unique(test.users)
    train_ptr, train_items = train.user_items()
    test_ptr, test_items = test.user_items()
    histories = _Histories(model, train, max_history)
    context = _request_context(model, test, users)
    ranked = np.full((len(users), k), -1, dtype=np.int64)
    starts = range(0, len(users), batch_size)
    with _inference(model):
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress or None, leave=False):
            batch = users[start : start + batch_size]
            exclude = _rows(train_ptr, train_items, batch)
            batch_t = torch.from_numpy(batch)
            if hasattr(model, "recommend"):
                ids, _ = model.recommend(batch_t, k, exclude=exclude)
            else:
                history, lengths = histories(batch_t)
                rows = None if context is None else {n: v[start : start + len(batch)] for n, v in context.items()}
                ids, _ = score(model, batch_t, k=k, exclude=exclude, history=history, lengths=lengths, context=rows)
            ids = torch.as_tensor(ids).cpu().numpy()  # [B, min(k, items)]
            ranked[start : start + len(batch), : ids.shape[1]] = ids
    return metrics.ranking_metrics(ranked, _rows(test_ptr, test_items, users), ks)


def _context_rows(model, data: Interactions):
    """The context fields ``model`` reads, one row per interaction of ``data`` (None for
    models without them)."""
    if not getattr(model, "uses_context", False):
        return None
    if data.features is None:
        raise ValueError(f"data: {type(model).__name__} reads context fields, and the data has no features")
    return data.features.select(model.context_fields).context.tensors()


def _request_context(model, test: Interactions, users: np.ndarray):
    """Each of ``users``' request context for full ranking: its first test interaction's
    (by time, else by position)."""
    rows = _context_rows(model, test)
    if rows is None:
        return None
    order = test.chronological_order() if test.timestamps is not None else np.argsort(test.users, kind="stable")
    sorted_users, first = np.unique(test.users[order], return_index=True)
    pick = torch.from_numpy(order[first[np.searchsorted(sorted_users, users)]])
    return {name: v[pick] for name, v in rows.items()}


def _pair_scores(model, users, items, histories, batch_size, output=0, context=None, forward=None):
    """Model outputs of aligned ``(users[j], items[j])``, in batches (float64 numpy,
    ``[n, ...]``); ``output`` picks the element of a tuple-returning forward; ``context``
    the pairs' context rows; ``forward`` replaces ``model`` (e.g. ``model.class_logits``)."""
    out = None
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    device = next(parameters, torch.empty(0)).device
    forward = model if forward is None else forward
    with _inference(model):
        for start in range(0, len(users), batch_size):
            u = torch.from_numpy(users[start : start + batch_size])
            i = torch.from_numpy(items[start : start + batch_size])
            history, lengths = histories(u)
            to = lambda t: None if t is None else t.to(device)  # noqa: E731
            extra = {}
            if context is not None:
                extra["context"] = {n: to(v[start : start + batch_size]) for n, v in context.items()}
            scores = forward(to(u), to(i), to(history), to(lengths), **extra)
            if isinstance(scores, tuple):
                scores = scores[output]
            if out is None:
                out = np.empty((len(users), *scores.shape[1:]), dtype=np.float64)
            out[start : start + len(u)] = scores.float().cpu().numpy()
    return np.empty(len(users), dtype=np.float64) if out is None else out


def evaluate_sampled(
    model,
    train: Interactions,
    test: Interactions,
    negatives=None,
    *,
    num_negatives: int = 100,
    ks=(10,),
    seed: int = 0,
    batch_size: int = 1024,
    max_history: int = 50,
):
    """Sampled ranking: each test interaction's item ranked among negatives.

    ``negatives [len(test), n]`` are given (e.g. NCF's ``.test.negative``) or,
    when ``None``, ``num_negatives`` are drawn uniformly from items the user
    has in neither ``train`` nor ``test``. A target's rank counts only the
    negatives scored strictly higher, and a negative equal to the target is
    dropped. Returns HR@K, NDCG@K, MRR and the sampled AUC.

    Each test row's user is scored once against its ``n + 1`` candidates, ``batch_size``
    rows at a time: a rankfast model through :func:`rankfast.score` with per-user
    candidates, a model with whole rows (``score(users)``, the baselines) once per
    distinct user with the candidates gathered from its row; other models by their
    pair scores.
    """
    _check_same_space(train, test, "test")
    batch_size = _check_batch_size(batch_size)
    if negatives is None:
        if int(num_negatives) < 1:
            raise ValueError(f"num_negatives: must be at least 1, got {num_negatives}")
        users, items = (np.concatenate(pair) for pair in ((train.users, test.users), (train.items, test.items)))
        both = Interactions(users, items, None, None, train.user_ids, train.item_ids)
        negatives = NegativeSampler(both).sample(test.users, num_negatives, np.random.default_rng(seed))
    negatives = as_ids("negatives", negatives, ndims=(2,), high=train.num_items, device="cpu").numpy()
    if negatives.shape[0] != len(test):
        raise ValueError(f"negatives: expected shape ({len(test)}, n), got {negatives.shape}")
    candidates = np.concatenate([test.items[:, None], negatives], axis=1)
    histories = _Histories(model, train, max_history)
    scores = _candidate_scores(model, test.users, candidates, histories, batch_size, _context_rows(model, test))
    valid = negatives != test.items[:, None]
    ranks = metrics.sampled_ranks(scores[:, 0], scores[:, 1:], valid)
    return metrics.rank_metrics(ranks, ks, num_negatives=valid.sum(axis=1))


def _candidate_scores(
    model, users: np.ndarray, candidates: np.ndarray, histories, batch_size: int, context=None
) -> np.ndarray:
    """float64 scores ``[R, C]`` of ``users[r]`` against ``candidates[r]``, ``batch_size`` rows at a
    time; ``context``: each row's context fields (models that read them)."""
    out = np.empty(candidates.shape, dtype=np.float64)
    if not isinstance(model, RankingModel) and not hasattr(model, "score"):
        pairs = _pair_scores(
            model, np.repeat(users, candidates.shape[1]), candidates.reshape(-1), histories, batch_size
        )
        return pairs.reshape(candidates.shape)
    with _inference(model):
        for start in range(0, len(users), batch_size):
            rows = slice(start, start + batch_size)
            batch, items = torch.from_numpy(users[rows]), torch.from_numpy(candidates[rows])
            if isinstance(model, RankingModel):
                history, lengths = histories(batch)
                row_context = None if context is None else {n: v[rows] for n, v in context.items()}
                got = score(model, batch, items, history=history, lengths=lengths, context=row_context)
            else:
                distinct, inverse = torch.unique(batch, return_inverse=True)
                got = torch.as_tensor(model.score(distinct)).cpu()[inverse].gather(1, items)  # each user once
            out[rows] = got.double().cpu().numpy()
    return out


def evaluate_pointwise(
    model,
    train: Interactions,
    data: Interactions,
    *,
    task: str = "rating",
    batch_size: int = 4096,
    max_history: int = 50,
):
    """Pointwise quality on ``data``'s own pairs.

    ``task="rating"``: the model predicts ``data.ratings``; MAE, MSE and RMSE
    (a :class:`rankfast.models.RecommenderNet` predicts its expected rating, and
    adds ``accuracy``, its most likely class against the rating's, and
    ``logloss``, the cross-entropy over its classes).
    ``task="click"``: the model's logits against 0/1 ``data.ratings``; log-loss,
    AUC, GAUC (grouped by user) and accuracy at logit 0 (probability 1/2).
    ``train`` supplies histories for models that need them.
    """
    _check_same_space(train, data, "data")
    if task not in ("rating", "click"):
        raise ValueError(f"task: expected 'rating' or 'click', got {task!r}")
    if data.ratings is None:
        raise ValueError("data: has no ratings or labels to compare with")
    histories = _Histories(model, train, max_history)
    batch_size = _check_batch_size(batch_size)
    context = _context_rows(getattr(model, "base", model), data)
    if task == "rating":
        if hasattr(model, "class_logits"):
            logits = _pair_scores(
                model, data.users, data.items, histories, batch_size, context=context, forward=model.class_logits
            )
            classes = model.class_index(data.ratings, where="data").numpy()
            scores = model.expected(torch.from_numpy(logits)).numpy()
            extra = {
                "accuracy": float((logits.argmax(axis=1) == classes).mean()),
                "logloss": metrics.cross_entropy(logits, classes),
            }
        else:
            scores = _pair_scores(model, data.users, data.items, histories, batch_size, 1, context=context)
            extra = {}
        return {
            "mae": metrics.mae(scores, data.ratings),
            "mse": metrics.mse(scores, data.ratings),
            "rmse": metrics.rmse(scores, data.ratings),
            **extra,
        }
    labels = data.ratings
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(f"data: row {bad[0]}: label {labels[bad[0]]} is not 0 or 1 (task 'click' needs 0/1 labels)")
    scores = _pair_scores(model, data.users, data.items, histories, batch_size, 0, context=context)
    return {
        "logloss": metrics.log_loss(scores, labels),
        "auc": metrics.auc(scores, labels),
        "gauc": metrics.gauc(scores, labels, data.users),
        "accuracy": metrics.accuracy(scores, labels, threshold=0.0),
    }
