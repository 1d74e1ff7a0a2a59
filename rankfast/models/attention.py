"""Target attention over the user's history (DIN-style), then an MLP over
``[E_u; pooled history; E_q]``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankfast._ids import history_mask
from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_widths
from rankfast.models.layers import MLP

ATTENTION_KINDS = ("din", "dot")


@dataclass
class AttentionConfig(ModelConfig):
    """
    ``attention``: ``"din"`` scores each history item ``h`` against the
    candidate ``q`` with an activation unit, an MLP over ``[h, q, h-q, h*q]``
    with widths ``unit_hidden`` then 1; ``"dot"`` uses ``<h, q> / sqrt(dim)``.
    ``normalize``: softmax the scores over the valid history items (True), or
    use the raw scores as weights, as the DIN paper does (False).
    ``hidden``, ``activation``, ``dropout``: the output MLP (``activation``
    is also the unit's; dropout applies only to the output MLP).
    """

    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    dropout: float = 0.0
    attention: str = "din"
    unit_hidden: tuple[int, ...] = (80, 40)
    normalize: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.hidden = check_widths("AttentionConfig", "hidden", self.hidden)
        self.unit_hidden = check_widths("AttentionConfig", "unit_hidden", self.unit_hidden)
        check_activation("AttentionConfig", self.activation)
        check_dropout("AttentionConfig", self.dropout)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"AttentionConfig.attention: expected one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"AttentionConfig.normalize: expected a bool, got {self.normalize!r}")


class AttentionModel(RankingModel):
    """``forward`` needs ``history [B, L]`` (item ids, padded; the padding
    value is ignored) and ``lengths [B]`` (valid items per row, 0 allowed: the
    pooled history is then zero)."""

    config_class = AttentionConfig
    uses_history = True

    def __init__(self, config: AttentionConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        d = config.dim
        if config.attention == "din":
            self.unit = MLP(4 * d, (*config.unit_hidden, 1), config.activation, dropout=0.0)
        self.tower = MLP(3 * d, (*config.hidden, 1), config.activation, config.dropout)

    def forward(self, users, items, history=None, lengths=None):
        h, q, mask = self._history_and_candidates(items, history, lengths)
        weights = attention_weights(self._logits(h, q), mask, self.config.normalize)
        pooled = (weights.unsqueeze(-1) * h).sum(1)
        return self.tower(torch.cat([self.user_repr(users), pooled, q], dim=-1)).squeeze(-1)

    def history_weights(self, users, items, history, lengths) -> torch.Tensor:
        """``[B, L]``: the weight of each history item in the pooled history of
        pair ``(users[j], items[j])``, as :meth:`forward` uses it (with
        ``normalize`` the softmax over the valid items, else the raw
        scores); 0 at padding. What :meth:`rankfast.Ranker.explain` reports."""
        h, q, mask = self._history_and_candidates(items, history, lengths)
        return attention_weights(self._logits(h, q), mask, self.config.normalize)

    def _history_and_candidates(self, items, history, lengths):
        """``(h [B, L, D], q [B, D], mask [B, L])``, padding read as item 0 and masked."""
        if history is None or lengths is None:
            raise ValueError("history: AttentionModel needs history [B, L] and lengths [B]")
        if history.dim() != 2 or lengths.shape != history.shape[:1]:
            raise ValueError(
                f"history: expected [B, L] with lengths [B], got {tuple(history.shape)} and {tuple(lengths.shape)}"
            )
        mask = history_mask(lengths, history.shape[1])
        return self.item_repr(history.masked_fill(~mask, 0)), self.item_repr(items), mask

    def _logits(self, h, q):
        """Attention scores ``[B, L]`` of history items ``h [B, L, D]`` for candidates ``q [B, D]``."""
        if self.config.attention == "din":
            qe = q.unsqueeze(1).expand_as(h)
            return self.unit(torch.cat([h, qe, h - qe, h * qe], dim=-1)).squeeze(-1)
        return (h * q.unsqueeze(1)).sum(-1) / math.sqrt(self.config.dim)


def attention_weights(logits: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Pooling weights of attention ``logits [..., L]`` over the valid history items
    ``mask`` (broadcastable): their softmax (``normalize``) or the logits themselves,
    0 at padding. An empty history gets all-zero weights (and finite gradients)."""
    if not normalize:
        return logits * mask
    # A finite fill keeps an empty history's weights (and gradients) finite;
    # multiplying by the mask then zeroes them.
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * mask
