"""Differentiable scores of users against the whole item catalogue (for the full softmax)."""

from __future__ import annotations

import torch

from rankfast.models import DotModel, ItemItem, RankingModel, SASRec

__all__ = ["catalogue_scores", "CatalogueScores", "sequence_scores", "SequenceScores"]


def catalogue_scores(model: RankingModel, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
    """``[len(users), num_items]`` scores of each user against every item, with
    gradients; with ``items [N]``, against those items only (``[len(users), N]``).

    A :class:`DotModel` is one matrix product (its forward, restructured),
    reading each item's row once; an :class:`ItemItem` sums the weight rows of
    each user's history items (:meth:`ItemItem.user_scores`) and takes the
    candidates' columns; any other model without history runs its
    forward on every (user, item) pair, which is exact but costs
    ``len(users) * N`` forward rows.
    """
    if getattr(model, "uses_history", False):
        raise ValueError(f"model: {type(model).__name__} reads histories; catalogue scores need a history-free model")
    if isinstance(model, DotModel):
        if items is None:
            rows, item_bias = model.item_repr.all(), model.item_bias
        else:
            rows, item_bias = model.item_repr(items), model.item_bias[items]
        user_term = model.user_bias[users] + model.bias
        return model.user_repr(users) @ rows.T + item_bias[None, :] + user_term[:, None]
    if isinstance(model, ItemItem):
        return model.user_scores(users, items)
    if items is None:
        items = torch.arange(model.config.num_items, device=users.device)
    pair_users = users.repeat_interleave(len(items))
    return model(pair_users, items.repeat(len(users))).view(len(users), len(items))


class CatalogueScores(torch.nn.Module):
    """``forward(users, items=None) -> catalogue_scores(model, users, items)``: a module to wrap in
    DistributedDataParallel, so full-softmax steps synchronise gradients."""

    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return catalogue_scores(self.model, users, items)


def sequence_scores(
    model: SASRec,
    windows: torch.Tensor,
    lengths: torch.Tensor,
    select: torch.Tensor,
    items: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores, with gradients, of the user vectors at the positions ``select
    [W, L]`` (bool) of a sequence model's windows ``[W, L]`` (one causal pass
    over each window; :func:`rankfast.data.sequence_windows`): ``[T, num_items]``
    against every item, or with ``items [T, C]`` against each selected
    position's own candidates, ``[T, C]``; ``T`` the selected positions in
    row-major order."""
    vectors = model.encode(windows, lengths)[select]  # [T, D]
    if items is None:
        return vectors @ model.item_repr.all().T + model.item_bias[None, :]
    rows = model.item_repr(items)  # [T, C, D]
    return torch.bmm(rows, vectors.unsqueeze(-1)).squeeze(-1) + model.item_bias[items]


class SequenceScores(torch.nn.Module):
    """``forward(windows, lengths, select, items=None) -> sequence_scores(model, ...)``: a module to
    wrap in DistributedDataParallel."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, windows, lengths, select, items=None):
        return sequence_scores(self.model, windows, lengths, select, items)
