"""A full-rank learned item-item model: a user's score of item ``i`` is their history row
times column ``i`` of an ``[items, items]`` weight matrix whose diagonal is ignored, plus an
item bias (EASE^R's form, trained by gradient descent)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankfast.baselines import ease_weights
from rankfast.data import history_features
from rankfast.models.base import ModelConfig, RankingModel


@dataclass
class ItemItemConfig(ModelConfig):
    """The weights are ``[num_items, num_items]``, so the model has no width of its own:
    ``dim`` and ``user_feature_dim`` are the catalogue size (filled in when left unset;
    any other value is an error). Users are their history rows (``user_features``, e.g.
    :func:`rankfast.data.history_features`), read as they are; items have no features or
    feature fields."""

    dim: int | None = None

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("dim", "user_feature_dim"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, self.num_items)
            elif value != self.num_items:
                raise ValueError(
                    f"{owner}.{name}: the item-item weights are [num_items, num_items] and users are history rows "
                    f"over the items, so {name} must be num_items={self.num_items} (or unset), got {value!r}"
                )
        super().__post_init__()
        if self.item_feature_dim is not None or self.item_hybrid or self.user_hybrid:
            raise ValueError(
                f"{owner}.item_feature_dim: an item is a row and a column of the item-item weights; item features "
                "and hybrid sides do not apply (leave item_feature_dim, user_hybrid and item_hybrid unset)"
            )
        if self.fields:
            raise ValueError(f"{owner}.fields: the item-item model reads no feature fields")


class ItemItem(RankingModel):
    """``score(u, i) = sum_{j != i} h_uj W_ji + b_i``: the user's history row ``h_u``
    (``user_features [num_users, num_items]``, a fixed buffer, e.g. the L2-normalised
    binary rows of :func:`rankfast.data.history_features`) times column ``i`` of the
    learned item-item weights ``W [num_items, num_items]``, leaving out the item's own
    entry (the diagonal of ``W`` never counts, so no item explains itself), plus a learned
    item bias. It is EASE^R's form (Steck, 2019), full rank, learned by gradient descent:
    train it with the full softmax (``TrainConfig(loss="softmax", negatives="all")``).

    ``W`` is ``model.weights`` (it lives in ``item_repr.embedding.weight``): row ``j``
    holds item ``j``'s weight, as a history item, on every candidate, the orientation of
    EASE^R's ``scores = rows @ B``. It starts at ``weights`` when given (e.g.
    :func:`rankfast.baselines.ease_weights`, EASE^R's closed form, to fine-tune it), else
    at zero; the item bias starts at zero. The history rows may be replaced after training
    (``model.user_repr.set_features(rows)``, e.g. the history weighted by recency), which
    changes what the weights read but not the weights.

    Dense: ``W`` is ``num_items ** 2`` floats (9,742 items: 380 MB, and AdamW keeps two
    more copies while training), meant for catalogues of some ten thousand items.
    """

    config_class = ItemItemConfig
    projects_user_features = False

    def __init__(self, config: ItemItemConfig, *, user_features=None, item_features=None, features=None, weights=None):
        super().__init__(config, config.num_items, user_features, item_features, features)
        self.item_bias = nn.Parameter(torch.zeros(config.num_items))
        with torch.no_grad():
            if weights is None:
                self.weights.zero_()
            else:
                shape = (config.num_items, config.num_items)
                if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
                    raise TypeError(f"weights: expected a floating-point tensor of shape {shape}")
                if tuple(weights.shape) != shape:
                    raise ValueError(f"weights: expected shape {shape}, got {tuple(weights.shape)}")
                self.weights.copy_(weights)

    @classmethod
    def from_interactions(
        cls, config: ItemItemConfig, data, *, ease_lambda: float | None, half_life: float | None, floor: float
    ) -> ItemItem:
        """An ItemItem over ``data``'s users: their history rows weighted by recency
        (:func:`rankfast.data.history_features` with ``half_life`` and ``floor``), its weights
        starting at EASE^R's fitted on ``data`` at ``ease_lambda``
        (:func:`rankfast.baselines.ease_weights`; None or 0: at zero)."""
        rows = history_features(data, half_life=half_life, floor=floor)
        return cls(config, user_features=rows, weights=ease_weights(data, ease_lambda) if ease_lambda else None)

    @property
    def weights(self) -> torch.Tensor:
        """The item-item weights ``W [num_items, num_items]`` (a parameter; its diagonal is ignored)."""
        return self.item_repr.embedding.weight

    def forward(self, users, items, history=None, lengths=None):
        rows = self.user_repr(users)  # [B, I]
        columns = self.weights[:, items].T  # [B, I]: each candidate's column
        own = rows.gather(-1, items[..., None])[..., 0] * self.weights[items, items]
        return (rows * columns).sum(-1) - own + self.item_bias[items]

    def user_scores(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(users), len(items)]``: each user's score of ``items [N]`` (None: every item, in
        order), with gradients. The rows are sparse (a user's items), so the product sums the
        weights' rows of each user's items, restricted to the candidates' columns
        (``F.embedding_bag``), rather than multiplying a dense ``[users, items]`` matrix."""
        rows = self.user_repr(users)
        owner, cols = rows.nonzero(as_tuple=True)  # row-major: owners ascending
        offsets = torch.searchsorted(owner, torch.arange(len(rows), device=rows.device))
        w, bias = self.weights, self.item_bias
        own = rows * torch.diagonal(w)
        if items is not None:  # only the candidates' columns: a part of the catalogue costs its share
            w, bias, own = w[:, items], bias[items], own[:, items]
        out = F.embedding_bag(cols, w, offsets, mode="sum", per_sample_weights=rows[owner, cols].to(w.dtype))
        return out - own + bias
