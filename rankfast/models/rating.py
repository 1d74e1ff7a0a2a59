"""Rating classification: an MLP with a softmax over the rating classes (the seed's RecommenderNet)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_widths
from rankfast.models.layers import MLP

__all__ = ["RecommenderNet", "RecommenderNetConfig"]


@dataclass
class RecommenderNetConfig(ModelConfig):
    """``classes``: the rating values, ascending (MovieLens: 0.5 to 5 in steps of 0.5).
    ``hidden``: the MLP's hidden widths; its output layer has one unit per class."""

    classes: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        classes = tuple(float(c) for c in self.classes)
        if len(classes) < 2 or any(b <= a for a, b in zip(classes[:-1], classes[1:], strict=True)):
            raise ValueError(f"RecommenderNetConfig.classes: expected two or more ascending values, got {self.classes}")
        if not all(np.isfinite(classes)):
            raise ValueError(f"RecommenderNetConfig.classes: expected finite values, got {self.classes}")
        self.classes = classes
        self.hidden = check_widths("RecommenderNetConfig", "hidden", self.hidden)
        check_activation("RecommenderNetConfig", self.activation)
        check_dropout("RecommenderNetConfig", self.dropout)


class RecommenderNet(RankingModel):
    """``class_logits(users, items) -> [B, C]``: an MLP over ``[E_u; E_i]`` whose output
    layer has a unit per rating class (trained with cross-entropy,
    ``TrainConfig(task="rating", loss="ce")``); ``forward`` is the expected rating under
    their softmax, ``sum_c p_c * classes[c]``, which is what ranking scores."""

    config_class = RecommenderNetConfig

    def __init__(self, config: RecommenderNetConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        self.tower = MLP(2 * config.dim, (*config.hidden, len(config.classes)), config.activation, config.dropout)
        self.register_buffer("class_values", torch.tensor(config.classes), persistent=False)

    def class_logits(self, users, items, history=None, lengths=None) -> torch.Tensor:
        return self.tower(torch.cat([self.user_repr(users), self.item_repr(items)], dim=-1))

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """The expected rating of class logits ``[..., C]``."""
        return torch.softmax(logits, dim=-1) @ self.class_values.to(logits.dtype)

    def forward(self, users, items, history=None, lengths=None):
        return self.expected(self.class_logits(users, items))

    def class_index(self, ratings, where: str = "ratings") -> torch.Tensor:
        """The class of each rating (int64); a rating that is not a class is a ``ValueError``
        naming its row."""
        ratings = torch.as_tensor(ratings)
        values = self.class_values.to(device=ratings.device, dtype=torch.float64)
        pos = torch.searchsorted(values, ratings.double()).clamp(max=len(values) - 1)
        bad = (values[pos] != ratings.double()).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise ValueError(
                f"{where}: row {row}: rating {float(ratings.reshape(-1)[row])} is not one of the model's rating "
                f"classes {list(self.config.classes)}"
            )
        return pos
