"""Differentiable scores of users against the whole item catalogue (for the full softmax)."""

from __future__ import annotations

import torch

from rankfast.models import DotModel, RankingModel

__all__ = ["catalogue_scores", "CatalogueScores"]


def catalogue_scores(model: RankingModel, users: torch.Tensor) -> torch.Tensor:
    """``[len(users), num_items]`` scores of each user against every item, with gradients.

    A :class:`DotModel` is one matrix product (its forward, restructured);
    any other model without history runs its forward on every (user, item)
    pair, which is exact but costs ``len(users) * num_items`` forward rows.
    """
    if getattr(model, "uses_history", False):
        raise ValueError(f"model: {type(model).__name__} reads histories; catalogue scores need a history-free model")
    num_items = model.config.num_items
    if isinstance(model, DotModel):
        items = model.item_repr.all()
        user_term = model.user_bias[users] + model.bias
        return model.user_repr(users) @ items.T + model.item_bias[None, :] + user_term[:, None]
    all_items = torch.arange(num_items, device=users.device)
    pair_users = users.repeat_interleave(num_items)
    return model(pair_users, all_items.repeat(len(users))).view(len(users), num_items)


class CatalogueScores(torch.nn.Module):
    """``forward(users) -> catalogue_scores(model, users)``: a module to wrap in
    DistributedDataParallel, so full-softmax steps synchronise gradients."""

    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return catalogue_scores(self.model, users)
