"""Factorization machines over feature fields: FM (Rendle, 2010) and DeepFM (Guo et al., 2017).

Every field ``f`` of a pair (the user id, the user's fields, the context fields, the
item id, the item's fields) has a factor ``v_f`` (``dim`` wide) and a weight ``w_f``;
a multi-valued field's are pooled over its bag, a dense field's are linear in its
numbers. The FM score is ``b + sum_f w_f + sum_{f<g} <v_f, v_g>``; DeepFM adds an MLP
over the concatenated factors ``[v_1; ...; v_F]`` (the embeddings are shared). Factors
and weights start small (:data:`rankfast.models.fields.FACTOR_INIT_STD`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_widths
from rankfast.models.fields import init_factors
from rankfast.models.layers import MLP

__all__ = ["FMConfig", "FMModel", "DeepFMConfig", "DeepFM", "fm_terms"]


def fm_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scalar, factor sum)`` of fields ``x [..., F, dim + 1]`` (each field's factor, then
    its weight): ``sum_f w_f + sum_{f<g} <v_f, v_g>`` and ``sum_f v_f``. The pairs are
    ``(|sum v|^2 - sum |v|^2) / 2``, so a set of fields split into two parts has
    ``scalar = scalar_1 + scalar_2 + <sum_1, sum_2>``: the factorization every fast path uses."""
    v, w = x[..., :-1], x[..., -1]
    total = v.sum(-2)
    return w.sum(-1) + 0.5 * (total.square().sum(-1) - v.square().sum((-2, -1))), total


@dataclass
class FMConfig(ModelConfig):
    """``dim``: the factor width. ``fields``: the feature fields (user, item, context)."""


class FMModel(RankingModel):
    """The factorization machine (see the module docstring). ``forward(users, items,
    history=None, lengths=None, context=None)``: ``context`` holds the context fields'
    encoded values per pair (``{name: [B] / [B, max_len] / [B, dim]}``), None for the
    out-of-vocabulary values."""

    config_class = FMConfig
    reads_context = True

    def __init__(self, config: FMConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim + 1, user_features, item_features, features)
        self.bias = nn.Parameter(torch.zeros(()))
        init_factors(self)

    @property
    def num_fields(self) -> int:
        """Fields of a pair: both ids and every feature field."""
        return 2 + len(self.config.fields)

    def fm(self, x: torch.Tensor) -> torch.Tensor:
        """The FM score of fields ``x [..., F, dim + 1]``."""
        return self.bias + fm_terms(x)[0]

    def forward(self, users, items, history=None, lengths=None, context=None):
        return self.fm(self.field_vectors(users, items, context))


@dataclass
class DeepFMConfig(FMConfig):
    """``hidden``: the deep part's hidden widths (its output layer, width 1, is added)."""

    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.hidden = check_widths("DeepFMConfig", "hidden", self.hidden)
        check_activation("DeepFMConfig", self.activation)
        check_dropout("DeepFMConfig", self.dropout)


class DeepFM(FMModel):
    """FM plus an MLP over the fields' factors, concatenated in the order of
    :meth:`RankingModel.field_vectors` (user side, context, item side)."""

    config_class = DeepFMConfig

    def __init__(self, config: DeepFMConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, user_features=user_features, item_features=item_features, features=features)
        self.tower = MLP(self.num_fields * config.dim, (*config.hidden, 1), config.activation, config.dropout)

    def forward(self, users, items, history=None, lengths=None, context=None):
        x = self.field_vectors(users, items, context)
        return self.fm(x) + self.tower(x[..., :-1].flatten(-2)).squeeze(-1)
