"""Matrix factorization: score = <E_u, E_i> + user bias + item bias + global bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankfast.models.base import ModelConfig, RankingModel


@dataclass
class DotConfig(ModelConfig):
    """Only the common fields (see :class:`ModelConfig`)."""


class DotModel(RankingModel):
    config_class = DotConfig

    def __init__(self, config: DotConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        self.user_bias = nn.Parameter(torch.zeros(config.num_users))
        self.item_bias = nn.Parameter(torch.zeros(config.num_items))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, users, items, history=None, lengths=None):
        dot = (self.user_repr(users) * self.item_repr(items)).sum(-1)
        return dot + self.user_bias[users] + self.item_bias[items] + self.bias
