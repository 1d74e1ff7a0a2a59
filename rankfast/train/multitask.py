"""Multi-task wrapper: click logits and rating regression on shared representations."""

from __future__ import annotations

import torch
from torch import nn

from rankfast.models import MLP, RankingModel

__all__ = ["MultiTask"]


class MultiTask(nn.Module):
    """Adds a rating head to a ranking model.

    ``forward`` returns ``(click_logits, ratings)``: the click logits are the
    base model's scores; the ratings come from an MLP over the base's user
    and item representations, so both tasks train the same embeddings. Rank
    with ``base`` (it is a plain :class:`RankingModel`).

    The head predicts around the training ratings' mean, in units of their
    standard deviation: ``ratings = rating_mean + rating_std * head(...)``,
    buffers that :func:`rankfast.fit` sets from the training data
    (:meth:`set_rating_scale`), so the head starts at the mean and the rating
    loss, the MSE in units of ``rating_std`` (:meth:`rating_loss`), is about 1
    whatever the rating scale. The training loss is
    ``click_weight * ranking loss + rating_weight * rating loss``. A head
    predicting raw ratings from 0 (as before) started with an MSE of about 13
    on MovieLens' stars, which pulled the shared embeddings its way: a DotModel
    on ml-latest-small lost a tenth of its validation NDCG@20 with it; in
    ``rating_std`` units the default ``rating_weight=1`` was the best of the
    weights tried on that validation split and above the single-task model
    (``bench/results/multitask-ml-latest-small.md``). Check it on your data's
    validation split the same way.
    """

    def __init__(self, base: RankingModel, *, hidden=(64,), click_weight: float = 1.0, rating_weight: float = 1.0):
        super().__init__()
        if not isinstance(base, RankingModel):
            raise TypeError(f"base: expected a rankfast.models.RankingModel, got {type(base).__name__}")
        if click_weight < 0 or rating_weight < 0 or click_weight + rating_weight == 0:
            raise ValueError(
                f"click_weight, rating_weight: must be non-negative and not both 0, got {click_weight}, {rating_weight}"
            )
        self.base = base
        self.click_weight, self.rating_weight = float(click_weight), float(rating_weight)
        dim = base.user_repr.dim + base.item_repr.dim
        self.rating_head = MLP(dim, (*hidden, 1), "relu", 0.0)
        self.register_buffer("rating_mean", torch.zeros(()))
        self.register_buffer("rating_std", torch.ones(()))

    @property
    def uses_history(self) -> bool:
        return self.base.uses_history

    def set_rating_scale(self, ratings) -> None:
        """``rating_mean`` and ``rating_std`` from training ratings (a constant set gets std 1)."""
        ratings = torch.as_tensor(ratings, dtype=torch.float64)
        std = float(ratings.std(correction=0)) if len(ratings) else 0.0
        with torch.no_grad():
            self.rating_mean.fill_(float(ratings.mean()) if len(ratings) else 0.0)
            self.rating_std.fill_(std if std > 0 else 1.0)

    def rating_loss(self, predicted: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """The mean squared error of ``predicted`` ratings in units of ``rating_std``."""
        return ((predicted - ratings) / self.rating_std).pow(2).mean()

    def forward(self, users, items, history=None, lengths=None, rated=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(click logits [B], ratings)`` of aligned pairs; ``rated``: the positions of the
        pairs to rate (training rates the positives, not their negatives), default all."""
        rows = slice(None) if rated is None else rated
        shared = torch.cat([self.base.user_repr(users[rows]), self.base.item_repr(items[rows])], dim=-1)
        ratings = self.rating_mean + self.rating_std * self.rating_head(shared).squeeze(-1)
        return self.base(users, items, history, lengths), ratings
