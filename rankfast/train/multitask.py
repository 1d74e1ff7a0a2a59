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
    and item representations, so both tasks train the same embeddings. The
    training loss is ``click_weight * ranking loss + rating_weight * MSE``.
    Rank with ``base`` (it is a plain :class:`RankingModel`).
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

    @property
    def uses_history(self) -> bool:
        return self.base.uses_history

    def forward(self, users, items, history=None, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        shared = torch.cat([self.base.user_repr(users), self.base.item_repr(items)], dim=-1)
        return self.base(users, items, history, lengths), self.rating_head(shared).squeeze(-1)
