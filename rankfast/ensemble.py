"""Blends of trained models: one ranking from the weighted sum of several models' scores."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from rankfast._ids import as_ids
from rankfast.data import Interactions, user_histories
from rankfast.models import RankingModel
from rankfast.selection import topk

__all__ = ["Blend"]


class Blend:
    """Scores ``sum_k weights[k] * models[k](user, item)``: e.g. a model of the
    user's long-term taste (an item-based tower) with a sequential one
    (:class:`rankfast.models.SASRec`), each trained on its own. Raw scores
    (logits) are summed, so a weight also sets its model's scale; choose the
    weights on a validation split.

    ``train``: the data the models were trained on; models that read
    histories get each user's last ``max_history`` items of it, as
    :func:`rankfast.evaluate.evaluate` gives them. The blend answers the calls
    :mod:`rankfast.evaluate` makes of a model: ``recommend(users, k,
    exclude=...)`` (each model scores every item through
    :func:`rankfast.score`, a block of users at a time) and ``blend(users,
    items)`` for aligned pairs. It is not a :class:`RankingModel`: it has no
    model directory; save its models and weights.
    """

    def __init__(
        self,
        models: Sequence[RankingModel],
        weights: Sequence[float],
        train: Interactions,
        *,
        max_history: int = 50,
    ):
        models, weights = list(models), list(weights)
        if not models or len(models) != len(weights):
            raise ValueError(f"weights: expected one weight per model, got {len(weights)} for {len(models)} models")
        for j, model in enumerate(models):
            if not isinstance(model, RankingModel):
                raise TypeError(f"models[{j}]: expected a rankfast.models.RankingModel, got {type(model).__name__}")
            if (model.config.num_users, model.config.num_items) != (train.num_users, train.num_items):
                raise ValueError(
                    f"models[{j}]: built for {model.config.num_users} users and {model.config.num_items} items, "
                    f"train has {train.num_users} and {train.num_items}"
                )
        for j, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not torch.isfinite(torch.tensor(float(w))):
                raise ValueError(f"weights[{j}]: expected a finite number, got {w!r}")
        self.models, self.weights = models, [float(w) for w in weights]
        self.num_users, self.num_items = train.num_users, train.num_items
        self.history = self.lengths = None
        if any(m.uses_history for m in models):
            history, lengths = user_histories(train, max_history)
            self.history, self.lengths = torch.from_numpy(history), torch.from_numpy(lengths)

    def score(self, users) -> torch.Tensor:
        """float32 scores ``[len(users), num_items]`` of every item."""
        from rankfast.scoring import score  # the scoring package imports the models

        users = as_ids("users", users, ndims=(0, 1), high=self.num_users).reshape(-1)
        total = torch.zeros(len(users), self.num_items)
        for model, weight in zip(self.models, self.weights, strict=True):
            extra = (self.history[users], self.lengths[users]) if model.uses_history else (None, None)
            total += weight * score(model, users, history=extra[0], lengths=extra[1]).float().cpu()
        return total

    def recommend(self, users, k: int, *, exclude=None):
        """Top-``k`` ``(item_ids, scores)`` per user, ``exclude`` as in :func:`rankfast.topk`."""
        values, ids = topk(self.score(users), k, exclude=exclude)
        return ids, values

    def __call__(self, users, items, history=None, lengths=None) -> torch.Tensor:
        """Scores of aligned ``(users[j], items[j])`` pairs (``history`` unused: the blend's own is read)."""
        users = as_ids("users", users, ndims=(0, 1), high=self.num_users).reshape(-1)
        items = as_ids("items", items, ndims=(0, 1), high=self.num_items).reshape(-1)
        if items.shape != users.shape:
            raise ValueError(f"items: shape {tuple(items.shape)} does not match users {tuple(users.shape)}")
        return self.score(users).gather(1, items[:, None])[:, 0]
