"""SASRec (Kang and McAuley, 2018): causal self-attention over the user's item
sequence; the output at the last item is the user vector, and an item's score
is its dot product with that vector plus an item bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankfast._ids import history_mask
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

    def _qkv(self, x: torch.Tensor):
        b, length, d = x.shape
        return self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, L]``: each head's causal attention weights (row: query position), as
        :meth:`forward` applies them without dropout."""
        q, k, _ = self._qkv(x)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self._qkv(x)
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
        x = self._embed(history, lengths)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _embed(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The first block's input ``[B, L, dim]``: item plus position embeddings."""
        length = history.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"history: SASRec.encode reads at most max_len={self.config.max_len} items, got {length}")
        valid = history_mask(lengths, length)
        # Padding sits after the valid items, so causal attention never lets a valid item see it.
        return self.dropout(self.item_repr(history.masked_fill(~valid, 0)) + self.positions.weight[:length])

    def _window(self, history, lengths):
        """``(history, lengths, start)``: each row's last ``max_len`` valid items (``start [B]``:
        where they begin in the given rows), after checking the shapes."""
        if history is None or lengths is None:
            raise ValueError("history: SASRec needs history [B, L] and lengths [B]")
        if history.dim() != 2 or lengths.shape != history.shape[:1]:
            raise ValueError(
                f"history: expected [B, L] with lengths [B], got {tuple(history.shape)} and {tuple(lengths.shape)}"
            )
        max_len = self.config.max_len
        start = torch.zeros_like(lengths)
        if history.shape[1] > max_len:  # the last max_len valid items of each row
            start = (lengths - max_len).clamp(min=0)
            history = history.gather(1, start[:, None] + torch.arange(max_len, device=history.device))
            lengths = lengths.clamp(max=max_len)
        return history, lengths, start

    def user_vectors(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, dim]``: the output at each row's last valid item of ``history [B, L]``
        (the row's last ``max_len`` items are read); zero for an empty history."""
        history, lengths, _ = self._window(history, lengths)
        b, length = history.shape
        if length == 0:
            return self.norm.weight.new_zeros(b, self.config.dim)
        out = self.encode(history, lengths)[torch.arange(b, device=history.device), (lengths - 1).clamp(min=0)]
        return out * (lengths > 0)[:, None].to(out.dtype)

    def history_weights(self, users, items, history, lengths) -> torch.Tensor:
        """``[B, L]``: how much each item of ``history`` weighs in the user vector: the last
        block's attention from the last valid position, averaged over its heads (the weights
        over the items read sum to 1). The same for every candidate (``items`` is unused: the
        user vector does not depend on it); 0 at padding and at items older than the last
        ``max_len``. What :meth:`rankfast.Ranker.explain` reports. Each distinct history is
        encoded once (an explanation repeats the user's history for every candidate)."""
        self._window(history, lengths)  # the shapes, checked before deduplicating
        keys, inverse = torch.unique(torch.cat([history, lengths[:, None]], dim=1), dim=0, return_inverse=True)
        if len(keys) < len(history):
            return self.history_weights(None, None, keys[:, :-1], keys[:, -1])[inverse]
        window, lens, start = self._window(history, lengths)
        weights = self.norm.weight.new_zeros(history.shape)
        b, length = window.shape
        if length == 0:
            return weights
        x = self._embed(window, lens)
        for block in self.blocks[:-1]:
            x = block(x)
        rows = torch.arange(b, device=history.device)
        last = self.blocks[-1].attention(x)[rows, :, (lens - 1).clamp(min=0)].mean(1)  # [B, length]
        valid = history_mask(lens, length)
        return weights.scatter_(1, start[:, None] + torch.arange(length, device=history.device), last * valid)

    def forward(self, users, items, history=None, lengths=None):
        u = self.user_vectors(history, lengths)
        return (u * self.item_repr(items)).sum(-1) + self.item_bias[items]
