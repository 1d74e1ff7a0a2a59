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

The field models split the same way, with a user's request context on the user
side (it is the same for all the user's candidates): a factorization machine's
pairs are ``scalar_u + scalar_i + <S_u, S_i>`` (each side's weights and
within-side pairs, and the dot of the sides' factor sums); DeepFM adds the split
MLP; DCN-v2's cross layers mix the sides per pair, so after the split first
cross layer they run on the tile.

The scorers follow :class:`rankfast.scoring.protocol.Scorer`; the models'
``forward`` is the reference they are tested against. :func:`training_scores` is
the same restructuring with gradients, for training an AttentionModel (each user
against its own candidates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankfast._ids import history_mask
from rankfast.models.attention import AttentionModel, attention_weights
from rankfast.models.base import RankingModel
from rankfast.models.dcn import DCNv2
from rankfast.models.dot import DotModel
from rankfast.models.fm import DeepFM, FMModel, fm_terms
from rankfast.models.itemitem import ItemItem
from rankfast.models.mlp import MLPModel
from rankfast.models.neumf import GMF, NeuMF
from rankfast.models.rating import RecommenderNet
from rankfast.models.sequential import SASRec
from rankfast.scoring.protocol import Footprint, Scorer

__all__ = [
    "AttentionScorer",
    "DCNScorer",
    "DeepFMScorer",
    "DotScorer",
    "FMScorer",
    "GMFScorer",
    "ItemItemScorer",
    "MLPScorer",
    "NeuMFScorer",
    "RecommenderNetScorer",
    "SASRecScorer",
    "scorer_for",
    "trains",
    "training_scores",
    "unit_table_reuse",
]

#: History items processed at once by the attention path (blocks are balanced: L=100 gives 2 x 50).
HISTORY_BLOCK = 64
#: The DIN unit is tabled over distinct history items when that saves this factor of work:
#: in scoring (shared candidates only) when a block's valid history slots are at least this
#: many times its distinct items; in training when a batch's (pair, history slot)s are at
#: least this many times its distinct candidates times distinct history items.
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


class ItemItemScorer(Scorer):
    """The block's users against the whole catalogue once (:meth:`ItemItem.user_scores`: the
    weight rows of each user's history items summed, the diagonal left out, the item bias
    added); candidates then only gather their columns."""

    def __init__(self, model: ItemItem, users, history=None, lengths=None):
        self.scores = model.user_scores(users)  # [U, num_items]

    def items(self, ids):
        return ids

    def pairs(self, rows: slice, ids):
        scores = self.scores[rows]
        return scores[:, ids] if ids.dim() == 1 else scores.gather(1, ids)

    @staticmethod
    def footprint(model: ItemItem, history_len: int) -> Footprint:
        # A block holds its users' history rows and their scores of every item.
        return Footprint(user=2 * model.config.num_items, item=1, pair=1)


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


class GMFScorer(Scorer):
    """The output layer's weights fold into the user side: one dot product per pair."""

    def __init__(self, model: GMF, users, history=None, lengths=None):
        self.model = model
        self.u = model.user_repr(users) * model.output.weight[0]

    def items(self, ids):
        return self.model.item_repr(ids)

    def pairs(self, rows: slice, e_i):
        return _pair_dot(self.u[rows], e_i) + self.model.output.bias

    @staticmethod
    def footprint(model: GMF, history_len: int) -> Footprint:
        return Footprint(user=model.config.dim, item=model.config.dim, pair=1)


class NeuMFScorer(Scorer):
    """The GMF term folds the output layer's GMF weights into the user side,
    so it is one dot product per pair."""

    def __init__(self, model: NeuMF, users, history=None, lengths=None):
        self.model = model
        w_gmf, w_mlp = model.output.weight[0].split([model.config.gmf_dim, model.config.hidden[-1]])
        self.w_mlp_out = w_mlp.unsqueeze(0)
        w_u, self.w_i = model.branch.linears[0].weight.chunk(2, dim=1)
        gmf_u, mlp_u = model.split(model.user_repr(users))
        self.gmf_u = gmf_u * w_gmf
        self.a = F.linear(mlp_u, w_u)

    def items(self, ids):
        gmf_i, mlp_i = self.model.split(self.model.item_repr(ids))
        return gmf_i, F.linear(mlp_i, self.w_i, self.model.branch.linears[0].bias)

    def pairs(self, rows: slice, state):
        gmf_i, c = state
        mlp = self.model.branch.from_first(self.a[rows, None] + c, inplace=True)
        return _pair_dot(self.gmf_u[rows], gmf_i) + F.linear(mlp, self.w_mlp_out, self.model.output.bias).squeeze(-1)

    @staticmethod
    def footprint(model: NeuMF, history_len: int) -> Footprint:
        cfg = model.config
        per_side = 2 * cfg.gmf_dim + cfg.mlp_dim + cfg.hidden[0]
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
            self.w_h_unit, self.w_q_unit, self.w_x, self.b_unit = _split_unit(model)
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
                table[:, b] = _unit_logits(self.model, self.w_x, h[None, b], h_term[None, b], q, q_term, inplace=True)[
                    0
                ]
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
        return _unit_logits(self.model, self.w_x, h_b, self.h_term[rows, block], q, q_term, inplace=True)

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


def _split_unit(model: AttentionModel):
    """The DIN unit's first layer over ``[h, q, h-q, h*q]`` as ``(w_h, w_q, w_x, bias)``:
    ``W [h; q; h-q; h*q] + b = (Wh + Wd) h + (Wq - Wd) q + Wx (h*q) + b``."""
    first = model.unit.linears[0]
    w_h, w_q, w_d, w_x = first.weight.chunk(4, dim=1)
    return w_h + w_d, w_q - w_d, w_x, first.bias


def _unit_logits(model: AttentionModel, w_x, h, h_term, q, q_term, *, inplace: bool) -> torch.Tensor:
    """The DIN unit on history items ``h [T, L, D]`` (first-layer terms ``h_term [T, L, A1]``)
    and candidates ``q [Nc, D]`` (shared) or ``[T, Nc, D]`` (first-layer terms ``q_term``):
    ``[T, Nc, L]``. ``inplace`` (no gradients) lets the activations overwrite their inputs."""
    z = F.linear(h.unsqueeze(1) * q.unsqueeze(-2), w_x)  # the h*q term: [T, Nc, L, A1]
    z += h_term.unsqueeze(1)  # in place is safe with gradients too: linear's backward never reads z
    z += q_term.unsqueeze(-2)
    return model.unit.from_first(z, inplace=inplace).squeeze(-1)


def unit_table_reuse(model: RankingModel, history, lengths) -> float:
    """A history's valid slots per distinct item in them: how many times a DIN model's unit
    would run per (pair, slot) for each time it runs through the unit table, for shared
    candidates (0 for models without a DIN unit or without a history). Costs a device sync."""
    if not isinstance(model, AttentionModel) or model.config.attention != "din" or history is None:
        return 0.0
    distinct = torch.unique(history[history_mask(lengths, history.shape[1])]).numel()
    return float(lengths.sum()) / distinct if distinct else 0.0


def trains(model: RankingModel) -> bool:
    """Whether :func:`training_scores` covers ``model`` (an AttentionModel)."""
    return isinstance(model, AttentionModel)


def training_scores(model: AttentionModel, users, items, history, lengths) -> torch.Tensor:
    """``[B, W]`` scores of users ``[B]`` against their own candidates ``items [B, W]``
    (a positive and its negatives), with gradients: the model's forward restructured.

    Every distinct item's representation is computed once; the output MLP's first layer
    splits into user, candidate and pooled-history terms; the history is read once per
    user, not once per candidate. DIN's unit sees only (candidate, history item): when
    the batch has :data:`UNIT_TABLE_MIN_REUSE` times more (pair, history slot)s than
    (distinct candidate, distinct history item) pairs, it runs once per such pair into a
    table ``[Nc, Nh]`` that the pairs gather from; otherwise once per (pair, slot), with
    only the ``h*q`` term of its first layer computed there.
    """
    cfg = model.config
    mask = history_mask(lengths, history.shape[1])
    candidates, cand_col = torch.unique(items, return_inverse=True)
    distinct, hist_col = torch.unique(history.masked_fill(~mask, 0), return_inverse=True)
    e_cand, e_hist = model.item_repr(candidates), model.item_repr(distinct)
    h = e_hist[hist_col]  # [B, L, D]
    if cfg.attention == "dot":
        logits = torch.matmul(e_cand[cand_col], h.transpose(1, 2)) / math.sqrt(cfg.dim)
    else:
        w_h, w_q, w_x, bias = _split_unit(model)
        if UNIT_TABLE_MIN_REUSE * len(candidates) * len(distinct) <= items.numel() * history.shape[1]:
            h_term, q_term = F.linear(e_hist, w_h, bias), F.linear(e_cand, w_q)
            table = _unit_logits(model, w_x, e_hist[None], h_term[None], e_cand, q_term, inplace=False)[0]
            logits = table[cand_col.unsqueeze(-1), hist_col.unsqueeze(1)]  # [B, W, L]
        else:
            q = e_cand[cand_col]  # [B, W, D]
            logits = _unit_logits(model, w_x, h, F.linear(h, w_h, bias), q, F.linear(q, w_q), inplace=False)
    pooled = torch.matmul(attention_weights(logits, mask.unsqueeze(1), cfg.normalize), h)  # [B, W, D]
    first = model.tower.linears[0]
    w_user, w_pooled, w_item = first.weight.chunk(3, dim=1)
    pre = F.linear(model.user_repr(users), w_user, first.bias).unsqueeze(1)
    pre = pre + F.linear(e_cand, w_item)[cand_col] + F.linear(pooled, w_pooled)
    return model.tower.from_first(pre).squeeze(-1)


def _blocks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


class FMScorer(Scorer):
    """FMModel: per user (with its context) the factor sum ``S_u`` and scalar ``s_u`` (global
    bias, weights, pairs within the request's fields), per item ``S_i`` and ``s_i``; a pair is
    ``s_u + s_i + <S_u, S_i>`` (:func:`rankfast.models.fm.fm_terms`)."""

    def __init__(self, model: FMModel, users, history=None, lengths=None, context=None):
        self.model = model
        self.x_user = model.request_fields(users, context)
        self.s_user, self.sum_user = fm_terms(self.x_user)
        self.s_user = self.s_user + model.bias

    def items(self, ids):
        x = self.model.item_repr.per_field(ids)
        s, total = fm_terms(x)
        return total, s, x

    def pairs(self, rows: slice, state):
        total, s, _ = state
        return _pair_dot(self.sum_user[rows], total) + self.s_user[rows, None] + s

    @staticmethod
    def footprint(model: FMModel, history_len: int) -> Footprint:
        side = (model.num_fields + 2) * (model.config.dim + 1)
        return Footprint(user=side, item=side, pair=2)


class DeepFMScorer(FMScorer):
    """DeepFM: the FM terms plus the MLP, its first layer split like :class:`MLPScorer`'s
    (request fields' columns per user, item fields' per item)."""

    def __init__(self, model: DeepFM, users, history=None, lengths=None, context=None):
        super().__init__(model, users, history, lengths, context)
        first = model.tower.linears[0]
        split = self.x_user.shape[-2] * model.config.dim
        self.w_item = first.weight[:, split:]
        self.a = F.linear(self.x_user[..., :-1].flatten(-2), first.weight[:, :split], first.bias)

    def items(self, ids):
        total, s, x = super().items(ids)
        return total, s, F.linear(x[..., :-1].flatten(-2), self.w_item)

    def pairs(self, rows: slice, state):
        deep = self.model.tower.from_first(self.a[rows, None] + state[2], inplace=True).squeeze(-1)
        return super().pairs(rows, state) + deep

    @staticmethod
    def footprint(model: DeepFM, history_len: int) -> Footprint:
        fm = FMScorer.footprint(model, history_len)
        width = model.config.hidden[0] if model.config.hidden else 1
        return Footprint(user=fm.user + width, item=fm.item + width, pair=2 * sum(model.config.hidden) + 3)


class DCNScorer(Scorer):
    """DCN-v2: the first cross layer and the deep network's first layer split into a per-user
    term (request fields' columns, the bias) and a per-item term; ``x0`` and the later cross
    layers are per pair, on the tile."""

    def __init__(self, model: DCNv2, users, history=None, lengths=None, context=None):
        self.model = model
        self.x_user = model.request_fields(users, context).flatten(-2)  # [U, Du]
        split = self.x_user.shape[-1]
        first = model.cross[0]
        self.w_cross_item = first.weight[:, split:]
        self.cross_user = F.linear(self.x_user, first.weight[:, :split], first.bias)
        if model.tower is not None:
            deep_first = model.tower.linears[0]
            self.w_deep_item = deep_first.weight[:, split:]
            self.deep_user = F.linear(self.x_user, deep_first.weight[:, :split], deep_first.bias)
        width = first.weight.shape[0]
        self.w_out_cross, self.w_out_deep = model.output.weight[:, :width], model.output.weight[:, width:]

    def items(self, ids):
        x = self.model.item_repr.per_field(ids).flatten(-2)  # [Nc, Di] or [T, Nc, Di]
        deep = None if self.model.tower is None else F.linear(x, self.w_deep_item)
        return x, F.linear(x, self.w_cross_item), deep

    def pairs(self, rows: slice, state):
        x_item, cross_item, deep_item = state
        t, n = self.x_user[rows].shape[0], x_item.shape[-2]
        x0 = torch.cat(
            [self.x_user[rows, None].expand(t, n, -1), x_item.expand(t, n, -1)], dim=-1
        )  # [T, Nc, D]: the per-pair input the cross layers mix
        x = x0 * (self.cross_user[rows, None] + cross_item) + x0
        for layer in self.model.cross[1:]:
            x = x0 * layer(x) + x
        out = F.linear(x, self.w_out_cross, self.model.output.bias)
        if deep_item is not None:
            deep = self.model.tower.from_first(self.deep_user[rows, None] + deep_item, inplace=True)
            out = out + F.linear(deep, self.w_out_deep)
        return out.squeeze(-1)

    @staticmethod
    def footprint(model: DCNv2, history_len: int) -> Footprint:
        cfg = model.config
        width = (2 + len(cfg.fields)) * cfg.dim
        h1 = cfg.hidden[0] if cfg.hidden else 0
        return Footprint(user=2 * width + h1, item=2 * width + h1, pair=4 * width + 2 * sum(cfg.hidden) + 2)


class RecommenderNetScorer(MLPScorer):
    """RecommenderNet: the class MLP's first layer split as :class:`MLPScorer` splits it, then
    the softmax over the classes and the expected rating per pair."""

    def pairs(self, rows: slice, c):
        return self.model.expected(self.model.tower.from_first(self.a[rows, None] + c, inplace=True))

    @staticmethod
    def footprint(model: RecommenderNet, history_len: int) -> Footprint:
        cfg = model.config
        width = cfg.hidden[0] if cfg.hidden else len(cfg.classes)
        return Footprint(user=cfg.dim + width, item=cfg.dim + width, pair=2 * sum(cfg.hidden) + 3 * len(cfg.classes))


_SCORERS = {
    DotModel: DotScorer,
    GMF: GMFScorer,
    MLPModel: MLPScorer,
    NeuMF: NeuMFScorer,
    AttentionModel: AttentionScorer,
    FMModel: FMScorer,
    DeepFM: DeepFMScorer,
    DCNv2: DCNScorer,
    RecommenderNet: RecommenderNetScorer,
    SASRec: SASRecScorer,
    ItemItem: ItemItemScorer,
}


def scorer_for(model: RankingModel) -> type[Scorer] | None:
    """The factorized scorer class for ``model``'s type (or its nearest base), None for other models."""
    return next((_SCORERS[cls] for cls in type(model).__mro__ if cls in _SCORERS), None)
