"""SASRec (Kang and McAuley, 2018): causal self-attention over the user's item
sequence; the output at the last item is the user vector, and an item's score
is its dot product with that vector plus an item bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankfast.models.base import ModelConfig, RankingModel, check_activation, check_dropout, check_positive_int
from rankfast.models.layers import MLP


@dataclass
class SASRecConfig(ModelConfig):
    """
    ``max_len``: the model reads each user's last ``max_len`` items (longer
    histories are cut to them), with a learned embedding per position (0 for
    the oldest item read). ``num_layers`` transformer blocks
    (pre-norm: layer norm, causal multi-head self-attention with
    ``num_heads`` heads, layer norm, a two-layer feed-forward network of width
    ``dim`` with ``activation``, each with a residual connection), then a
    final layer norm. ``dropout`` applies to the input embeddings, the
    attention weights, the feed-forward hidden layer and both residual
    branches. Users have no representation of their own: ``user_feature_dim``
    and ``user_hybrid`` must stay unset.
    """

    max_len: int = 50
    num_layers: int = 2
    num_heads: int = 1
    activation: str = "gelu"
    dropout: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_len", "num_layers", "num_heads"):
            check_positive_int("SASRecConfig", name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"SASRecConfig.num_heads: must divide dim={self.dim}, got {self.num_heads}")
        check_activation("SASRecConfig", self.activation)
        check_dropout("SASRecConfig", self.dropout)
        if self.user_feature_dim is not None or self.user_hybrid:
            raise ValueError(
                "SASRecConfig.user_feature_dim: SASRec represents a user by their item sequence; "
                "it takes no user features (leave user_feature_dim and user_hybrid unset)"
            )


class _Block(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int, activation: str, dropout: float):
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = MLP(dim, (dim, dim), activation, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout_p if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # [B, H, L, d/H]
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class SASRec(RankingModel):
    """``forward(users, items, history [B, L], lengths [B])``: ``history`` holds
    each row's items oldest first (as :func:`rankfast.data.user_histories` and
    :func:`~rankfast.data.event_histories` give them), the first ``lengths``
    of a row valid (the padding value is ignored). ``users`` is unused: the
    user is their sequence. The user vector is the transformer's output at the
    last valid item (:meth:`user_vectors`; zero for an empty history, whose
    scores are then the item biases), so scoring is a dot product, as for
    :class:`DotModel`."""

    config_class = SASRecConfig
    uses_history = True
    has_user_repr = False

    def __init__(self, config: SASRecConfig, *, user_features=None, item_features=None, features=None):
        super().__init__(config, config.dim, user_features, item_features, features)
        d = config.dim
        self.positions = nn.Embedding(config.max_len, d)
        nn.init.normal_(self.positions.weight, std=d**-0.5)
        self.blocks = nn.ModuleList(
            _Block(d, config.num_heads, config.activation, config.dropout) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        self.item_bias = nn.Parameter(torch.zeros(config.num_items))

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]``: the output at every position of ``history [B, L]``
        (``L <= max_len``); position ``t`` depends on the row's items ``0..t``
        only (causal attention), so it is the user vector of the history
        ``history[:, :t + 1]``. Outputs at padding positions mean nothing."""
        b, length = history.shape
        if length > self.config.max_len:
            raise ValueError(f"history: SASRec.encode reads at most max_len={self.config.max_len} items, got {length}")
        steps = torch.arange(length, device=history.device)
        valid = steps < lengths[:, None]
        # Padding sits after the valid items, so causal attention never lets a valid item see it.
        x = self.dropout(self.item_repr(history.masked_fill(~valid, 0)) + self.positions.weight[:length])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def user_vectors(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, dim]``: the output at each row's last valid item of ``history [B, L]``
        (the row's last ``max_len`` items are read); zero for an empty history."""
        if history is None or lengths is None:
            raise ValueError("history: SASRec needs history [B, L] and lengths [B]")
        if history.dim() != 2 or lengths.shape != history.shape[:1]:
            raise ValueError(
                f"history: expected [B, L] with lengths [B], got {tuple(history.shape)} and {tuple(lengths.shape)}"
            )
        max_len = self.config.max_len
        if history.shape[1] > max_len:  # the last max_len valid items of each row
            start = (lengths - max_len).clamp(min=0)
            history = history.gather(1, start[:, None] + torch.arange(max_len, device=history.device))
            lengths = lengths.clamp(max=max_len)
        b, length = history.shape
        if length == 0:
            return self.norm.weight.new_zeros(b, self.config.dim)
        out = self.encode(history, lengths)[torch.arange(b, device=history.device), (lengths - 1).clamp(min=0)]
        return out * (lengths > 0)[:, None].to(out.dtype)

    def forward(self, users, items, history=None, lengths=None):
        u = self.user_vectors(history, lengths)
        return (u * self.item_repr(items)).sum(-1) + self.item_bias[items]
