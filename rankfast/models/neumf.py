"""NeuMF (He et al., 2017): a GMF branch and an MLP branch joined in one output layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_widths
from rankfast.models.layers import MLP


@dataclass
class NeuMFConfig(ModelConfig):
    """``dim``: width of each branch's embeddings. ``hidden``: the MLP branch's
    layer widths (at least one); its last width joins the GMF vector."""

    hidden: tuple[int, ...] = (128, 64)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.hidden = check_widths("NeuMFConfig", "hidden", self.hidden, allow_empty=False)
        check_activation("NeuMFConfig", self.activation)
        check_dropout("NeuMFConfig", self.dropout)


class NeuMF(RankingModel):
    """Each representation is ``2 * dim`` wide: the first half feeds the GMF
    branch, the second the MLP branch (the same as two separate tables, but a
    feature-based side stores its feature matrix once)."""

    config_class = NeuMFConfig

    def __init__(self, config: NeuMFConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, 2 * config.dim, user_features, item_features, features)
        self.branch = MLP(2 * config.dim, config.hidden, config.activation, config.dropout, activate_last=True)
        self.output = nn.Linear(config.dim + config.hidden[-1], 1)

    def forward(self, users, items, history=None, lengths=None):
        gmf_u, mlp_u = self.user_repr(users).chunk(2, dim=-1)
        gmf_i, mlp_i = self.item_repr(items).chunk(2, dim=-1)
        mlp = self.branch(torch.cat([mlp_u, mlp_i], dim=-1))
        return self.output(torch.cat([gmf_u * gmf_i, mlp], dim=-1)).squeeze(-1)
