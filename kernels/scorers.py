"""The fused kernels behind ``rankfast.score``'s scorer interface.

``rankfast.scoring`` drives scorers through one interface (see
``rankfast/models/factorized.py``): ``Scorer(model, users, history, lengths)``
holds the user-side terms of a block of users; ``items(ids)`` computes the
item-side terms of candidates ``[Nc]`` (shared) or ``[T, Nc]`` (per user);
``pairs(rows, state)`` scores users ``rows`` against them, ``[T, Nc]``;
``footprint`` sizes chunks. Here ``pairs`` is one fused kernel launch, so a
pair costs only its score in memory and chunks are as large as the budget
allows. ``topk(rows, ids, k, exclude_mask)`` is the fused score + top-K
(positions into ``ids`` and values, ``[T, k]``).

:func:`fused_scorer` returns the class for a model, or ``None`` when the
kernels cannot run it (model type, depth, widths, dropout in training mode).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from rankfast.kernels import mlp_score as ms
from rankfast.kernels import target_attention as ta
from rankfast.kernels._common import split_term
from rankfast.models.factorized import Footprint


def _float32_elements(model, count: int) -> int:
    """``count`` float32 values (the split first-layer terms) in elements of the model's dtype."""
    return count * max(1, 4 // next(model.parameters()).element_size())


def _item_state(item_side, ids):
    """Item-side terms for shared ``[Nc]`` or per-user ``[T, Nc]`` candidate ids."""
    if ids.dim() == 1:
        return item_side(ids), None
    t, n = ids.shape
    return item_side(ids.reshape(-1)), torch.arange(t * n, device=ids.device).view(t, n)


class FusedMLPScorer:
    """MLPModel and NeuMF through ``rankfast::mlp_score`` (and ``mlp_score_topk``)."""

    def __init__(self, model, users, history=None, lengths=None):
        self.model = model
        user_side, self.item_side, weights, biases, w_out, b_out, activation, _ = ms._model_parts(model)
        self.a, self.gu = user_side(users)
        self.kw = dict(weights=weights, biases=biases, w_out=w_out, b_out=b_out, activation=activation)

    def items(self, ids):
        (c, gi), idx = _item_state(self.item_side, ids)
        return c, gi, idx

    def _args(self, rows, state):
        c, gi, idx = state
        gu = None if self.gu is None else self.gu[rows]
        return (self.a[rows], c, idx), dict(gu=gu, gi=gi, **self.kw)

    def pairs(self, rows: slice, state):
        args, kw = self._args(rows, state)
        return ms.mlp_score(*args, **kw)

    def topk(self, rows: slice, state, k, exclude_mask=None):
        args, kw = self._args(rows, state)
        return ms.mlp_score_topk(*args, k=k, exclude_mask=exclude_mask, **kw)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        side = (2 * cfg.dim if hasattr(model, "branch") else cfg.dim) + _float32_elements(model, cfg.hidden[0]) + cfg.dim
        return Footprint(user=side, item=side, pair=1)


class FusedAttentionScorer:
    """AttentionModel through ``rankfast::target_attention_score`` (and ``target_attention_topk``)."""

    def __init__(self, model, users, history, lengths):
        self.model = model
        self.users, self.history, self.lengths = users, history, lengths
        # User-side terms (histories, their unit terms, the users' first-layer term) once per block.
        (self.hist, self.lens, _, _, self.a, self.wp), self.kw = ta.model_inputs(
            model, users, torch.zeros(1, dtype=torch.long, device=users.device), history, lengths)
        self.ht = self.kw.pop("ht", None)
        self.kw.pop("qt", None)
        self.kw.pop("idx", None)
        cfg = model.config
        if cfg.attention == "din":
            unit_first = model.unit.linears[0]
            _, w_q, w_d, _ = unit_first.weight.chunk(4, dim=1)
            self.w_q_unit = w_q - w_d
        first = model.tower.linears[0]
        self.w_item = first.weight.chunk(3, dim=1)[2]

    def items(self, ids):
        flat = ids if ids.dim() == 1 else ids.reshape(-1)
        q = self.model.item_repr(flat)
        qt = split_term(q, self.w_q_unit) if self.model.config.attention == "din" else None
        cq = split_term(q, self.w_item)
        idx = None if ids.dim() == 1 else torch.arange(flat.numel(), device=ids.device).view(ids.shape)
        return q, qt, cq, idx

    def _args(self, rows, state):
        q, qt, cq, idx = state
        kw = dict(self.kw, idx=idx, qt=qt, ht=None if self.ht is None else self.ht[rows])
        return (self.hist[rows], self.lens[rows], q, cq, self.a[rows], self.wp), kw

    def pairs(self, rows: slice, state):
        args, kw = self._args(rows, state)
        return ta.target_attention_score(*args, **kw)

    def topk(self, rows: slice, state, k, exclude_mask=None):
        args, kw = self._args(rows, state)
        return ta.target_attention_topk(*args, k=k, exclude_mask=exclude_mask, **kw)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        a1 = cfg.unit_hidden[0] if cfg.attention == "din" else 0
        return Footprint(user=history_len * cfg.dim + _float32_elements(model, history_len * a1 + cfg.hidden[0]) + 1,
                         item=cfg.dim + _float32_elements(model, a1 + cfg.hidden[0]), pair=1)


def fused_scorer(model):
    """The fused scorer class for ``model``, or ``None`` if the kernels cannot run it."""
    if ms.supports(model):
        return FusedMLPScorer
    if ta.supports(model):
        return FusedAttentionScorer
    return None


def training_scores(model, users, items=None, history=None, lengths=None):
    """Differentiable scores ``[B, W]`` of ``users [B]`` against per-user
    candidates ``items [B, W]``, shared ones ``[W]``, or every item (``None``)
    through the fused forward and backward kernels: what :func:`rankfast.fit`
    trains on when :func:`rankfast.scoring.trains_fused` says so.

    Under autocast (``TrainConfig.bf16``) the kernels' inputs are cast to the
    autocast dtype, as autocast would cast a matmul's, except the split first
    layers' terms, which stay float32 (see ``split_term``); gradients flow back
    to the parameters in their own dtype.
    """
    if ms.supports(model):
        args, kw = ms._model_op_inputs(model, users, items)
        op, split = ms.mlp_score, args[:2]
    else:
        args, kw = ta.model_inputs(model, users, items, history, lengths)
        op, split = ta.target_attention_score, (*args[3:5], kw.get("ht"), kw.get("qt"))
    device = users.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        keep = {id(t) for t in split}

        def cast(t):
            low = isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in keep
            return t.to(dtype) if low else t

        args, kw = tree_map(cast, (args, kw))
    with torch.autocast(device, enabled=False):
        return op(*args, **kw)


def positions_bitmask(indptr, positions, num_rows, num_candidates, device):
    """Excluded candidate positions as CSR over rows -> the kernels' int32 bitmask ``[rows, ceil(N/32)]``."""
    words = (num_candidates + 31) // 32
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(num_rows), counts)
    flat = torch.unique(rows * num_candidates + positions.cpu())
    rows, pos = flat // num_candidates, flat % num_candidates
    mask = torch.zeros(num_rows * words, dtype=torch.int64)
    mask.index_add_(0, rows * words + pos // 32, torch.ones_like(pos) << (pos % 32))
    mask = torch.where(mask >= 2**31, mask - 2**32, mask)
    return mask.to(torch.int32).view(num_rows, words).to(device)


__all__ = ["FusedAttentionScorer", "FusedMLPScorer", "fused_scorer", "positions_bitmask"]
