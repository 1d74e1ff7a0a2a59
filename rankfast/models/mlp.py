"""Concat-MLP: score = MLP([E_u; E_i])."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_widths
from rankfast.models.layers import MLP


@dataclass
class MLPConfig(ModelConfig):
    """``hidden``: widths of the hidden layers (the output layer, width 1, is added)."""

    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.hidden = check_widths("MLPConfig", "hidden", self.hidden)
        check_activation("MLPConfig", self.activation)
        check_dropout("MLPConfig", self.dropout)


class MLPModel(RankingModel):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        self.tower = MLP(2 * config.dim, (*config.hidden, 1), config.activation, config.dropout)

    def forward(self, users, items, history=None, lengths=None):
        x = torch.cat([self.user_repr(users), self.item_repr(items)], dim=-1)
        return self.tower(x).squeeze(-1)
