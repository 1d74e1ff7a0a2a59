"""The factorized scoring path: each model's forward, restructured for B users x N candidates.

A concat-MLP's first layer splits, ``W1 [e_u; e_i] = W1u e_u + W1i e_i``, so the
user term (once per user) and the item term (once per candidate) are
precomputed and a pair only adds them; the ``[B*N, 2D]`` concatenation never
exists. Target attention splits the activation unit the same way: over
``[h, q, h-q, h*q]`` the first layer is ``(Wh + Wd) h + (Wq - Wd) q + Wx (h*q)``,
so only the ``h*q`` term is computed per (pair, history item), and the softmax
over the history runs online in blocks (as in flash attention). The unit sees
only the history item and the candidate, not the user, so when a block's
users share history items and candidates, it runs once per (candidate,
distinct history item) and each user gathers its logits from that table.
SASRec's user vector is computed once per user from the history, then it is
scored as a dot-product model.

The scorers follow :class:`rankfast.scoring.protocol.Scorer`; the models'
``forward`` is the reference they are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankfast._ids import history_mask
from rankfast.models.attention import AttentionModel
from rankfast.models.base import RankingModel
from rankfast.models.dot import DotModel
from rankfast.models.mlp import MLPModel
from rankfast.models.neumf import NeuMF
from rankfast.models.sequential import SASRec
from rankfast.scoring.protocol import Footprint, Scorer

__all__ = ["AttentionScorer", "DotScorer", "MLPScorer", "NeuMFScorer", "SASRecScorer", "scorer_for"]

#: History items processed at once by the attention path (blocks are balanced: L=100 gives 2 x 50).
HISTORY_BLOCK = 64
#: The DIN unit is tabled over distinct history items (shared candidates only) when a
#: block's valid history slots are at least this many times its distinct items.
UNIT_TABLE_MIN_REUSE = 1.5


def _pair_dot(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``u [T, D]`` against ``i [Nc, D]`` (shared) or ``i [T, Nc, D]`` -> ``[T, Nc]``."""
    if i.dim() == 2:
        return u @ i.T
    return torch.bmm(i, u.unsqueeze(-1)).squeeze(-1)


class DotScorer(Scorer):
    def __init__(self, model: DotModel, users, history=None, lengths=None):
        self.model = model
        self.u = model.user_repr(users)
        self.u_bias = model.user_bias[users] + model.bias

    def items(self, ids):
        return self.model.item_repr(ids), self.model.item_bias[ids]

    def pairs(self, rows: slice, state):
        e_i, b_i = state
        return _pair_dot(self.u[rows], e_i) + self.u_bias[rows, None] + b_i

    @staticmethod
    def footprint(model: DotModel, history_len: int) -> Footprint:
        d = model.config.dim
        return Footprint(user=d + 1, item=d + 1, pair=1)


class SASRecScorer(DotScorer):
    """The user vector from the history once per user of the block, then :class:`DotScorer`'s
    dot product with each candidate plus its bias."""

    def __init__(self, model: SASRec, users, history, lengths):
        self.model = model
        self.u = model.user_vectors(history, lengths)
        self.u_bias = self.u.new_zeros(len(self.u))

    @staticmethod
    def footprint(model: SASRec, history_len: int) -> Footprint:
        cfg = model.config
        length = min(history_len, cfg.max_len)
        # The transformer's activations while a block's user vectors are computed: the
        # residual stream, q/k/v, attention weights and the feed-forward hidden layer.
        return Footprint(user=length * (8 * cfg.dim + cfg.num_heads * length) + cfg.dim + 1, item=cfg.dim + 1, pair=1)


class MLPScorer(Scorer):
    def __init__(self, model: MLPModel, users, history=None, lengths=None):
        self.model = model
        w_u, self.w_i = model.tower.linears[0].weight.chunk(2, dim=1)
        self.a = F.linear(model.user_repr(users), w_u)

    def items(self, ids):
        return F.linear(self.model.item_repr(ids), self.w_i, self.model.tower.linears[0].bias)

    def pairs(self, rows: slice, c):
        return self.model.tower.from_first(self.a[rows, None] + c, inplace=True).squeeze(-1)

    @staticmethod
    def footprint(model: MLPModel, history_len: int) -> Footprint:
        cfg = model.config
        width = (cfg.hidden or (1,))[0]
        return Footprint(user=cfg.dim + width, item=cfg.dim + width, pair=2 * sum(cfg.hidden) + 1)


class NeuMFScorer(Scorer):
    """The GMF term folds the output layer's GMF weights into the user side,
    so it is one dot product per pair."""

    def __init__(self, model: NeuMF, users, history=None, lengths=None):
        self.model = model
        d = model.config.dim
        w_out = model.output.weight[0]
        self.w_mlp_out = w_out[d:].unsqueeze(0)
        w_u, self.w_i = model.branch.linears[0].weight.chunk(2, dim=1)
        gmf_u, mlp_u = model.user_repr(users).chunk(2, dim=-1)
        self.gmf_u = gmf_u * w_out[:d]
        self.a = F.linear(mlp_u, w_u)

    def items(self, ids):
        gmf_i, mlp_i = self.model.item_repr(ids).chunk(2, dim=-1)
        return gmf_i, F.linear(mlp_i, self.w_i, self.model.branch.linears[0].bias)

    def pairs(self, rows: slice, state):
        gmf_i, c = state
        mlp = self.model.branch.from_first(self.a[rows, None] + c, inplace=True)
        return _pair_dot(self.gmf_u[rows], gmf_i) + F.linear(mlp, self.w_mlp_out, self.model.output.bias).squeeze(-1)

    @staticmethod
    def footprint(model: NeuMF, history_len: int) -> Footprint:
        cfg = model.config
        per_side = 2 * cfg.dim + cfg.hidden[0]
        return Footprint(user=per_side, item=per_side, pair=2 * sum(cfg.hidden) + 2)


class AttentionScorer(Scorer):
    """History blocks are visited in order with a running maximum, softmax
    denominator and weighted sum (online softmax), so a tile holds
    ``[T, Nc, block, width]`` at most, whatever the history length.

    DIN with shared candidates: when the block's users repeat history items
    (:data:`UNIT_TABLE_MIN_REUSE`), ``items`` computes the unit's logits for
    each (candidate, distinct history item) once, ``[Nc, H]``, and tiles
    gather their users' columns; the table has at most ``footprint(...).table``
    columns, which the memory plan counts per shared candidate."""

    def __init__(self, model: AttentionModel, users, history, lengths):
        self.model = model
        cfg = model.config
        self.lengths = lengths.cpu()  # per-tile maxima without a device sync
        self.mask = history_mask(lengths, history.shape[1])
        history = history.masked_fill(~self.mask, 0)
        self.h = model.item_repr(history)  # [U, L, D]
        first = model.tower.linears[0]
        w_user, self.w_pooled, self.w_item = first.weight.chunk(3, dim=1)
        self.a = F.linear(model.user_repr(users), w_user, first.bias)
        n_blocks = max(1, math.ceil(history.shape[1] / HISTORY_BLOCK))
        self.block = max(1, math.ceil(history.shape[1] / n_blocks))
        self.distinct = None  # the unit table's columns: distinct history items' h and h-terms
        if cfg.attention == "din":
            unit_first = model.unit.linears[0]
            w_h, w_q, w_d, self.w_x = unit_first.weight.chunk(4, dim=1)
            self.w_h_unit, self.b_unit = w_h + w_d, unit_first.bias
            self.w_q_unit = w_q - w_d
            self.h_term = F.linear(self.h, self.w_h_unit, self.b_unit)  # [U, L, A1]
            self._plan_unit_table(history, self.footprint(model, history.shape[1]).table)

    def _plan_unit_table(self, history, max_columns):
        """Sets ``distinct`` (``h``, ``h_term`` of the distinct history items) and
        ``column [U, L]`` (each slot's column) when tabling the unit saves work."""
        ids, column = torch.unique(history, return_inverse=True)
        slots = int(self.lengths.sum())
        if 0 < len(ids) <= max_columns and slots >= UNIT_TABLE_MIN_REUSE * len(ids):
            h = self.model.item_repr(ids)
            self.distinct, self.column = (h, F.linear(h, self.w_h_unit, self.b_unit)), column

    def items(self, ids):
        q = self.model.item_repr(ids)
        if self.model.config.attention != "din":
            return q, None, F.linear(q, self.w_item), None
        q_term = F.linear(q, self.w_q_unit)
        table = None
        if self.distinct is not None and ids.dim() == 1:
            h, h_term = self.distinct
            table = q.new_empty(len(ids), len(h))  # [Nc, H]
            for b in _blocks(len(h), self.block):
                table[:, b] = self._unit_logits(h[None, b], h_term[None, b], q, q_term)[0]
        return q, q_term, F.linear(q, self.w_item), table

    def pairs(self, rows: slice, state):
        q, q_term, c, table = state
        h, mask = self.h[rows], self.mask[rows]
        t, n = h.shape[0], q.shape[-2]
        acc = h.new_zeros(t, n, h.shape[-1])
        normalize = self.model.config.normalize
        if normalize:
            running_max = h.new_full((t, n), float("-inf"))
            denom = h.new_zeros(t, n)
        valid_len = int(self.lengths[rows].max()) if t else 0
        for block in _blocks(valid_len, self.block):
            h_b = h[:, block]  # [T, Lb, D]
            if table is not None:
                logits = table[:, self.column[rows, block]].permute(1, 0, 2)  # [T, Nc, Lb]
            else:
                logits = self._logits(rows, block, h_b, q, q_term)  # [T, Nc, Lb]
            valid = mask[:, None, block]
            if normalize:
                logits = logits.masked_fill(~valid, float("-inf"))
                new_max = torch.maximum(running_max, logits.amax(-1))
                # Until a row has seen a valid item its maximum is -inf; offset by 0 then.
                offset = new_max.masked_fill(new_max == float("-inf"), 0.0)
                p = torch.exp(logits - offset.unsqueeze(-1))
                rescale = torch.exp(running_max - offset)
                denom = denom * rescale + p.sum(-1)
                acc = acc * rescale.unsqueeze(-1) + torch.matmul(p, h_b)
                running_max = new_max
            else:
                acc += torch.matmul(logits.masked_fill(~valid, 0.0), h_b)
        if normalize:
            acc = acc / denom.masked_fill(denom == 0, 1.0).unsqueeze(-1)  # empty history: pooled = 0
        pre = self.a[rows, None] + c + F.linear(acc, self.w_pooled)
        return self.model.tower.from_first(pre, inplace=True).squeeze(-1)

    def _logits(self, rows, block, h_b, q, q_term):
        """Attention scores of history items ``h_b [T, Lb, D]`` for each candidate: ``[T, Nc, Lb]``."""
        if self.model.config.attention == "dot":
            return torch.matmul(q, h_b.transpose(1, 2)) / math.sqrt(self.model.config.dim)
        return self._unit_logits(h_b, self.h_term[rows, block], q, q_term)

    def _unit_logits(self, h_b, h_term, q, q_term):
        """The DIN unit on history items ``h_b [T, Lb, D]`` (first-layer terms
        ``h_term [T, Lb, A1]``) and candidates ``q`` (``q_term``): ``[T, Nc, Lb]``."""
        z = F.linear(h_b.unsqueeze(1) * q.unsqueeze(-2), self.w_x)  # the h*q term: [T, Nc, Lb, A1]
        z += h_term.unsqueeze(1)
        z += q_term.unsqueeze(-2)
        return self.model.unit.from_first(z, inplace=True).squeeze(-1)

    @staticmethod
    def footprint(model: AttentionModel, history_len: int) -> Footprint:
        cfg = model.config
        d, h1 = cfg.dim, (cfg.hidden or (1,))[0]
        a1 = cfg.unit_hidden[0] if cfg.attention == "din" else 0
        per_item = d + 2 * sum(cfg.unit_hidden) + 4 if cfg.attention == "din" else 4
        block = min(history_len, HISTORY_BLOCK)
        pair = block * per_item + d + 3 + 2 * sum(cfg.hidden) + 1
        return Footprint(
            user=history_len * (d + a1 + 1) + d + h1,
            item=d + a1 + h1,
            pair=pair,
            table=pair if cfg.attention == "din" else 0,  # the unit table: as large as one pair's intermediates
        )


def _blocks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


_SCORERS = {
    DotModel: DotScorer,
    MLPModel: MLPScorer,
    NeuMF: NeuMFScorer,
    AttentionModel: AttentionScorer,
    SASRec: SASRecScorer,
}


def scorer_for(model: RankingModel) -> type[Scorer] | None:
    """The factorized scorer class for ``model``'s type (or its nearest base), None for other models."""
    return next((_SCORERS[cls] for cls in type(model).__mro__ if cls in _SCORERS), None)
