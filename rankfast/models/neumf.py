"""NeuMF (He et al., 2017): a GMF branch and an MLP branch joined in one output layer;
GMF, its generalized matrix factorization branch alone (for pretraining NeuMF)."""

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
from rankfast.models.layers import MLP
from rankfast.models.mlp import MLPModel


@dataclass
class GMFConfig(ModelConfig):
    """Only the common fields (see :class:`ModelConfig`); ``dim`` is the embeddings' width."""


class GMF(RankingModel):
    """Generalized matrix factorization: ``w . (E_u * E_i) + b``, a learned weighting of the
    embeddings' elementwise product (NeuMF's GMF branch, trained alone)."""

    config_class = GMFConfig

    def __init__(self, config: GMFConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        self.output = nn.Linear(config.dim, 1)

    def forward(self, users, items, history=None, lengths=None):
        return self.output(self.user_repr(users) * self.item_repr(items)).squeeze(-1)


@dataclass
class NeuMFConfig(ModelConfig):
    """``gmf_dim``, ``mlp_dim``: the widths of the GMF and MLP branches' embeddings
    (default: ``dim`` each). ``hidden``: the MLP branch's layer widths (at least
    one); its last width joins the GMF vector in the output layer."""

    hidden: tuple[int, ...] = (128, 64)
    activation: str = "relu"
    dropout: float = 0.0
    gmf_dim: int | None = None
    mlp_dim: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.hidden = check_widths("NeuMFConfig", "hidden", self.hidden, allow_empty=False)
        check_activation("NeuMFConfig", self.activation)
        check_dropout("NeuMFConfig", self.dropout)
        for name in ("gmf_dim", "mlp_dim"):
            check_positive_int("NeuMFConfig", name, getattr(self, name), optional=True)
        self.gmf_dim = self.dim if self.gmf_dim is None else int(self.gmf_dim)
        self.mlp_dim = self.dim if self.mlp_dim is None else int(self.mlp_dim)


class NeuMF(RankingModel):
    """Each representation is ``gmf_dim + mlp_dim`` wide: the first ``gmf_dim``
    elements feed the GMF branch, the rest the MLP branch (the same as two
    separate tables, but a feature-based side stores its feature matrix once).

    The paper's recipe pretrains the branches as separate models and starts
    NeuMF from them: :meth:`from_pretrained`."""

    config_class = NeuMFConfig

    def __init__(self, config: NeuMFConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.gmf_dim + config.mlp_dim, user_features, item_features, features)
        self.branch = MLP(2 * config.mlp_dim, config.hidden, config.activation, config.dropout, activate_last=True)
        self.output = nn.Linear(config.gmf_dim + config.hidden[-1], 1)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(GMF part, MLP part)`` of representations ``rows [..., gmf_dim + mlp_dim]``."""
        return rows.split([self.config.gmf_dim, self.config.mlp_dim], dim=-1)

    def forward(self, users, items, history=None, lengths=None):
        gmf_u, mlp_u = self.split(self.user_repr(users))
        gmf_i, mlp_i = self.split(self.item_repr(items))
        mlp = self.branch(torch.cat([mlp_u, mlp_i], dim=-1))
        return self.output(torch.cat([gmf_u * gmf_i, mlp], dim=-1)).squeeze(-1)

    @classmethod
    def from_pretrained(cls, gmf: GMF, mlp: MLPModel, alpha: float = 0.5) -> NeuMF:
        """NeuMF started from a trained :class:`GMF` and :class:`MLPModel` (ID
        embeddings, the same users and items), as the NeuMF paper pretrains it: the
        embeddings and the MLP's hidden layers are copied, and the output layer
        joins the two models' output layers weighted ``alpha`` and ``1 - alpha``,
        so the new model scores ``alpha * gmf + (1 - alpha) * mlp`` until it trains
        on (the paper then trains it with plain SGD)."""
        if not isinstance(gmf, GMF):
            raise TypeError(f"gmf: expected a rankfast.models.GMF, got {type(gmf).__name__}")
        if not isinstance(mlp, MLPModel):
            raise TypeError(f"mlp: expected a rankfast.models.MLPModel, got {type(mlp).__name__}")
        g, m = gmf.config, mlp.config
        if (g.num_users, g.num_items) != (m.num_users, m.num_items):
            raise ValueError(
                f"mlp: has {m.num_users} users and {m.num_items} items, gmf {g.num_users} and {g.num_items}"
            )
        for name, model in (("gmf", gmf), ("mlp", mlp)):
            if model.user_repr.uses_features or model.item_repr.uses_features:
                raise ValueError(f"{name}: from_pretrained takes models with ID embeddings on both sides")
        if not m.hidden:
            raise ValueError("mlp: needs at least one hidden layer (NeuMFConfig.hidden)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
        config = NeuMFConfig(
            g.num_users,
            g.num_items,
            g.dim,
            hidden=m.hidden,
            activation=m.activation,
            dropout=m.dropout,
            gmf_dim=g.dim,
            mlp_dim=m.dim,
        )
        reference = gmf.output.weight
        model = cls(config).to(device=reference.device, dtype=reference.dtype)
        last = mlp.tower.linears[-1]
        with torch.no_grad():
            for side in ("user_repr", "item_repr"):
                rows = [getattr(source, side).embedding.weight for source in (gmf, mlp)]
                getattr(model, side).embedding.weight.copy_(torch.cat(rows, dim=1))
            for target, source in zip(model.branch.linears, mlp.tower.linears[:-1], strict=True):
                target.load_state_dict(source.state_dict())
            model.output.weight.copy_(torch.cat([alpha * gmf.output.weight, (1 - alpha) * last.weight], dim=1))
            model.output.bias.copy_(alpha * gmf.output.bias + (1 - alpha) * last.bias)
        return model
