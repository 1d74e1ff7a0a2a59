"""DCN-v2 (Wang et al., 2021): a cross network and a deep network side by side over the
concatenated field vectors.

``x0 = [v_1; ...; v_F]`` (every field's vector, ``dim`` wide, in the order of
:meth:`RankingModel.field_vectors`); each cross layer is ``x_{l+1} = x0 * (W_l x_l + b_l)
+ x_l`` (full-rank ``W_l``); the deep network is an MLP over ``x0``; the output layer
reads ``[x_L; deep]`` (the parallel structure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankfast.models.base import (
    ModelConfig,
    RankingModel,
    check_activation,
    check_dropout,
    check_positive_int,
    check_widths,
)
from rankfast.models.fields import init_factors
from rankfast.models.layers import MLP

__all__ = ["DCNConfig", "DCNv2"]


@dataclass
class DCNConfig(ModelConfig):
    """``cross_layers``: cross layers (at least one). ``hidden``: the deep network's widths
    (empty: the cross network alone)."""

    cross_layers: int = 2
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("DCNConfig", "cross_layers", self.cross_layers)
        self.hidden = check_widths("DCNConfig", "hidden", self.hidden)
        check_activation("DCNConfig", self.activation)
        check_dropout("DCNConfig", self.dropout)


class DCNv2(RankingModel):
    """See the module docstring; ``forward`` takes ``context=`` as :class:`FMModel` does."""

    config_class = DCNConfig
    reads_context = True

    def __init__(self, config: DCNConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        init_factors(self)
        width = (2 + len(config.fields)) * config.dim
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(config.cross_layers))
        self.tower = None
        if config.hidden:
            self.tower = MLP(width, config.hidden, config.activation, config.dropout, activate_last=True)
        self.output = nn.Linear(width + (config.hidden[-1] if config.hidden else 0), 1)

    def forward(self, users, items, history=None, lengths=None, context=None):
        x0 = self.field_vectors(users, items, context).flatten(-2)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        if self.tower is not None:
            x = torch.cat([x, self.tower(x0)], dim=-1)
        return self.output(x).squeeze(-1)
