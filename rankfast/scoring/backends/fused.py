"""The fused backend: rankfast models through the Triton ops of ``rankfast.kernels``.

The kernels are pure ops (tensors in, tensors out); this module knows the
models. An adapter turns a model into an op's arguments: the split first
layer's per-user term ``a`` and per-item term ``c`` (float32, see
``split_term``), the layers after it, and for attention the history and its
unit terms. On top of the adapters:

- :class:`FusedMLPScorer`, :class:`FusedAttentionScorer`, :class:`FusedFMScorer`,
  :class:`FusedDCNScorer` and :class:`FusedRecommenderNetScorer`, the
  :class:`~rankfast.scoring.protocol.Scorer` classes of ``rankfast.score``: ``pairs``
  is one kernel launch, so a pair costs only its score in memory, and ``topk`` the
  fused score + top-K (DCN-v2, RecommenderNet: ``rankfast.score`` selects from the scores);
- :func:`model_scores` (differentiable) and :func:`model_topk`, a model's
  scores or top-K for users x candidates in one call;
- :func:`training_scores`, what :func:`rankfast.fit` trains on when
  :func:`rankfast.scoring.trains_fused` says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils._pytree import tree_map

from rankfast._ids import as_ids, check_history, check_k, check_range, exclude_csr, history_mask
from rankfast.kernels import cross_score as cs
from rankfast.kernels import mlp_score as ms
from rankfast.kernels import rating_score as rs
from rankfast.kernels import target_attention as ta
from rankfast.kernels import topk as kernel_topk
from rankfast.kernels._common import COMPUTE_DTYPES, MAX_WIDTH, split_term
from rankfast.models.attention import AttentionModel
from rankfast.models.base import RankingModel
from rankfast.models.dcn import DCNv2
from rankfast.models.fm import DeepFM, FMModel, fm_terms
from rankfast.models.mlp import MLPModel
from rankfast.models.neumf import NeuMF
from rankfast.models.rating import RecommenderNet
from rankfast.scoring.positions import excluded_positions, positions_to_ids
from rankfast.scoring.protocol import Footprint, Scorer

__all__ = [
    "FusedAttentionScorer",
    "FusedDCNScorer",
    "FusedFMScorer",
    "FusedMLPScorer",
    "FusedRecommenderNetScorer",
    "OpCall",
    "model_scores",
    "model_topk",
    "op_call",
    "scorer_for",
    "training_scores",
]


# --- models as op arguments ---------------------------------------------------------------


class _MLPAdapter:
    """An :class:`MLPModel` or :class:`NeuMF` as arguments of ``rankfast::mlp_score``, or a
    :class:`RecommenderNet` as arguments of ``rankfast::rating_score``: the same split first
    layer and hidden layers, its output layer the class head (``w_classes``, ``b_classes``,
    ``class_values``) rather than one unit."""

    def __init__(self, model: MLPModel | NeuMF | RecommenderNet):
        self.model = model
        if isinstance(model, NeuMF):
            d = model.config.gmf_dim
            self.first, rest = model.branch.linears[0], model.branch.linears[1:]
            w_out, self.w_gmf = model.output.weight[0, d:], model.output.weight[0, :d]
            b_out = model.output.bias
        else:
            self.first, rest, last = model.tower.linears[0], model.tower.linears[1:-1], model.tower.linears[-1]
            w_out, b_out, self.w_gmf = last.weight[0], last.bias, None
        if isinstance(model, RecommenderNet):
            head = dict(w_classes=last.weight, b_classes=last.bias, class_values=model.class_values)
        else:
            head = dict(w_out=w_out, b_out=b_out)
        self.w_user, self.w_item = self.first.weight.chunk(2, dim=1)
        self.layers = dict(
            weights=[m.weight for m in rest],
            biases=[m.bias for m in rest],
            **head,
            activation=model.config.activation,
        )

    @staticmethod
    def covers(model: RankingModel) -> bool:
        cfg = model.config
        if isinstance(model, NeuMF):
            return len(cfg.hidden) <= ms.MAX_LAYERS and max(cfg.hidden + (cfg.gmf_dim, cfg.mlp_dim)) <= MAX_WIDTH
        if isinstance(model, RecommenderNet) and len(cfg.classes) > rs.MAX_CLASSES:
            return False
        if isinstance(model, MLPModel | RecommenderNet):  # without hidden layers there are no pair activations
            return 1 <= len(cfg.hidden) <= ms.MAX_LAYERS and max(cfg.hidden + (cfg.dim,)) <= MAX_WIDTH
        return False

    def users(self, users):
        """``(a, gu)``: the first layer's user term (its bias included) and NeuMF's GMF user vectors
        (times the output layer's GMF weights; None for an MLPModel)."""
        e = self.model.user_repr(users)
        if self.w_gmf is None:
            return split_term(e, self.w_user, self.first.bias), None
        gmf, mlp = self.model.split(e)
        return split_term(mlp, self.w_user, self.first.bias), gmf * self.w_gmf

    def items(self, ids):
        """``(c, gi)``: the first layer's item term and NeuMF's GMF item vectors (None for an MLPModel)."""
        e = self.model.item_repr(ids)
        if self.w_gmf is None:
            return split_term(e, self.w_item), None
        gmf, mlp = self.model.split(e)
        return split_term(mlp, self.w_item), gmf


class _AttentionAdapter:
    """An :class:`AttentionModel` as arguments of ``rankfast::target_attention_score``."""

    def __init__(self, model: AttentionModel):
        self.model = model
        cfg = model.config
        tower = model.tower.linears
        self.first = tower[0]
        self.w_user, self.w_pooled, self.w_item = self.first.weight.chunk(3, dim=1)
        self.layers = dict(
            kind=cfg.attention,
            normalize=cfg.normalize,
            activation=cfg.activation,
            weights=[m.weight for m in tower[1:-1]],
            biases=[m.bias for m in tower[1:-1]],
            w_out=tower[-1].weight[0],
            b_out=tower[-1].bias,
        )
        self.unit_first = None
        if cfg.attention == "din":
            unit = model.unit.linears
            self.unit_first = unit[0]
            w_h, w_q, w_d, w_x = self.unit_first.weight.chunk(4, dim=1)
            self.w_h_unit, self.w_q_unit = w_h + w_d, w_q - w_d
            self.layers.update(
                wx=w_x,
                unit_weights=[m.weight for m in unit[1:-1]],
                unit_biases=[m.bias for m in unit[1:-1]],
                unit_w_out=unit[-1].weight[0],
                unit_b_out=unit[-1].bias,
            )
        else:
            self.layers["scale"] = 1.0 / math.sqrt(cfg.dim)

    @staticmethod
    def covers(model: RankingModel) -> bool:
        if not isinstance(model, AttentionModel):
            return False
        cfg = model.config
        if not 1 <= len(cfg.hidden) <= ms.MAX_LAYERS or max(cfg.hidden + (cfg.dim,)) > MAX_WIDTH:
            return False
        if cfg.attention == "din":
            return 1 <= len(cfg.unit_hidden) <= ta.MAX_UNIT_LAYERS and max(cfg.unit_hidden) <= MAX_WIDTH
        return True

    def users(self, users, history, lengths) -> dict:
        """The user-side op arguments: ``hist`` (history vectors, padding read as item 0), ``lengths``,
        the output MLP's user term ``a`` and pooled block ``wp``, and DIN's history term ``ht``."""
        valid = torch.arange(history.shape[1], device=history.device) < lengths[:, None]
        hist = self.model.item_repr(history.masked_fill(~valid, 0))
        out = dict(
            hist=hist,
            lengths=lengths,
            a=split_term(self.model.user_repr(users), self.w_user, self.first.bias),
            wp=self.w_pooled,
        )
        if self.unit_first is not None:
            out["ht"] = split_term(hist, self.w_h_unit, self.unit_first.bias)
        return out

    def items(self, ids) -> dict:
        """The item-side op arguments: candidate vectors ``q``, their output-MLP term ``cq`` and DIN's ``qt``."""
        q = self.model.item_repr(ids)
        out = dict(q=q, cq=split_term(q, self.w_item))
        if self.unit_first is not None:
            out["qt"] = split_term(q, self.w_q_unit)
        return out


def scorer_for(model: RankingModel) -> type[Scorer] | None:
    """The fused scorer class for ``model``, or None where the kernels cannot run it (type, depth,
    widths; float64 models take the eager backends)."""
    if next(model.parameters()).dtype not in COMPUTE_DTYPES:
        return None
    if _MLPAdapter.covers(model):
        return FusedRecommenderNetScorer if isinstance(model, RecommenderNet) else FusedMLPScorer
    if _AttentionAdapter.covers(model):
        return FusedAttentionScorer
    if _FMAdapter.covers(model):
        return FusedFMScorer
    if _DCNAdapter.covers(model):
        return FusedDCNScorer
    return None


def _candidate_rows(items: torch.Tensor, num_items: int):
    """``(ids, idx)``: the item ids whose item-side terms an op reads, and its candidate index
    (None: every row, in order). Shared candidates are read as given; per-user candidates
    ``[B, N]`` index the whole table when they are at least as many, else their own rows."""
    if items.dim() == 1:
        return items, None
    b, n = items.shape
    if b * n >= num_items:
        return torch.arange(num_items, device=items.device), items
    return items.reshape(-1), torch.arange(b * n, device=items.device).view(b, n)


# --- rankfast.score's scorers ---------------------------------------------------------------


_SPLIT_TERMS = ("a", "cq", "ht", "qt")


def scoring_terms(model, term):
    """A split first layer's term as scoring passes it: float32 (see ``split_term``) when gradients
    are being recorded (training), the model's dtype otherwise, so a bf16 model's scores run on
    bf16 operands end to end (half the bytes to read per pair). Each term is then rounded before
    the kernel adds them, an error of about one bf16 ulp of the larger term, inside the 2e-2
    tolerance of bf16 scoring; gradients keep float32 terms."""
    dtype = next(model.parameters()).dtype
    return term if torch.is_grad_enabled() or dtype == torch.float32 else term.to(dtype)


def _scoring_side(model, args: dict) -> dict:
    """The split terms among an attention op's arguments, as :func:`scoring_terms` passes them."""
    return {k: scoring_terms(model, v) if k in _SPLIT_TERMS else v for k, v in args.items()}


def _float32_elements(model, count: int) -> int:
    """``count`` float32 values (the split first-layer terms) in elements of the model's dtype."""
    return count * max(1, 4 // next(model.parameters()).element_size())


class _FusedScorer(Scorer):
    """``pairs`` is one launch of ``op``, ``topk`` one of ``op_topk``, on the keyword arguments of
    :meth:`_op_args`; ``items`` returns ``(item-side arguments, idx, N)``."""

    max_fused_k = kernel_topk.MAX_K
    thread_safe = False  # on a CPU the kernels run in Triton's interpreter, which is not thread-safe
    op: ClassVar[Callable]
    op_topk: ClassVar[Callable]

    def pairs(self, rows: slice, state):
        return self.op(**self._op_args(rows, state), check_ids=False)  # rankfast.score checked them

    def topk(self, rows: slice, state, k, skip=None):
        mask = None
        if skip is not None:
            mask = kernel_topk.positions_bitmask(*skip, rows.stop - rows.start, state[-1], self.device)
        return self.op_topk(**self._op_args(rows, state), k=k, exclude_mask=mask, check_ids=False)


class FusedMLPScorer(_FusedScorer):
    """MLPModel and NeuMF through ``rankfast::mlp_score`` (and ``mlp_score_topk``)."""

    op, op_topk = staticmethod(ms.mlp_score), staticmethod(ms.mlp_score_topk)

    def __init__(self, model, users, history=None, lengths=None):
        self.model, self.device = model, users.device
        self.adapter = _MLPAdapter(model)
        a, self.gu = self.adapter.users(users)
        self.a = scoring_terms(model, a)

    def items(self, ids):
        rows, idx = _candidate_rows(ids, self.model.config.num_items)
        c, gi = self.adapter.items(rows)
        return dict(c=scoring_terms(self.model, c), gi=gi), idx, ids.shape[-1]

    def _op_args(self, rows, state):
        item_side, idx, _ = state
        gu = None if self.gu is None else self.gu[rows]
        return dict(a=self.a[rows], gu=gu, **item_side, idx=idx, **self.adapter.layers)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        rep = cfg.gmf_dim + cfg.mlp_dim if isinstance(model, NeuMF) else cfg.dim
        side = rep + _float32_elements(model, cfg.hidden[0]) + cfg.dim
        return Footprint(user=side, item=side, pair=1)


class FusedAttentionScorer(_FusedScorer):
    """AttentionModel through ``rankfast::target_attention_score`` (and ``target_attention_topk``)."""

    op, op_topk = staticmethod(ta.target_attention_score), staticmethod(ta.target_attention_topk)

    def __init__(self, model, users, history, lengths):
        self.model, self.device = model, users.device
        self.adapter = _AttentionAdapter(model)
        self.user_side = _scoring_side(model, self.adapter.users(users, history, lengths))

    def items(self, ids):
        rows, idx = _candidate_rows(ids, self.model.config.num_items)
        return _scoring_side(self.model, self.adapter.items(rows)), idx, ids.shape[-1]

    def _op_args(self, rows, state):
        item_side, idx, _ = state
        user_side = {name: t if name == "wp" else t[rows] for name, t in self.user_side.items()}
        return dict(user_side, **item_side, idx=idx, **self.adapter.layers)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        a1 = cfg.unit_hidden[0] if cfg.attention == "din" else 0
        return Footprint(
            user=history_len * cfg.dim + _float32_elements(model, history_len * a1 + cfg.hidden[0]) + 1,
            item=cfg.dim + _float32_elements(model, a1 + cfg.hidden[0]),
            pair=1,
        )


class _FMAdapter:
    """An :class:`FMModel` or :class:`DeepFM` as arguments of ``rankfast::mlp_score``, no kernel
    of its own: the GMF slot carries the factorization machine. A pair's FM score is
    ``s_u + s_i + <S_u, S_i>`` (:func:`rankfast.models.fm.fm_terms`, the user's context on the
    user side), so ``gu = [S_u, 1, s_u]`` and ``gi = [S_i, s_i, 1]`` give it as one dot product.
    DeepFM's MLP is the op's MLP, its first layer split into the request fields' term ``a``
    and the item fields' term ``c``; a plain FM runs a zero MLP of width 1 (``act(0) = 0``)."""

    def __init__(self, model: FMModel):
        self.model = model
        self.deep = isinstance(model, DeepFM)
        if self.deep:
            linears = model.tower.linears
            self.first = linears[0]
            self.layers = dict(
                weights=[m.weight for m in linears[1:-1]],
                biases=[m.bias for m in linears[1:-1]],
                w_out=linears[-1].weight[0],
                b_out=linears[-1].bias,
                activation=model.config.activation,
            )
        else:
            zero = model.bias.new_zeros(1)
            self.layers = dict(weights=[], biases=[], w_out=zero, b_out=zero, activation="relu")

    @staticmethod
    def covers(model: RankingModel) -> bool:
        if not isinstance(model, FMModel) or model.config.dim + 2 > MAX_WIDTH:
            return False
        if isinstance(model, DeepFM):
            hidden = model.config.hidden
            return 1 <= len(hidden) <= ms.MAX_LAYERS and max(hidden) <= MAX_WIDTH
        return True

    def _side(self, x: torch.Tensor, weight: torch.Tensor | None, bias=None):
        """``(mlp term, S, s)`` of fields ``x [..., F, dim + 1]`` (the term: float32, zeros for an FM)."""
        s, total = fm_terms(x)
        if self.deep:
            term = split_term(x[..., :-1].flatten(-2), weight, bias)
        else:
            term = x.new_zeros(*x.shape[:-2], 1, dtype=torch.float32)
        return term, total, s

    def users(self, users, context=None):
        """``(a, gu)``: the MLP's user term (its first bias included) and ``[S_u, 1, s_u + bias]``."""
        x = self.model.request_fields(users, context)
        weight = self.first.weight[:, : x.shape[-2] * self.model.config.dim] if self.deep else None
        a, total, s = self._side(x, weight, self.first.bias if self.deep else None)
        return a, torch.cat([total, torch.ones_like(s)[:, None], (s + self.model.bias)[:, None]], dim=-1)

    def items(self, ids):
        """``(c, gi)``: the MLP's item term and ``[S_i, s_i, 1]``."""
        x = self.model.item_repr.per_field(ids)
        weight = self.first.weight[:, -x.shape[-2] * self.model.config.dim :] if self.deep else None
        c, total, s = self._side(x, weight)
        return c, torch.cat([total, s[..., None], torch.ones_like(s)[..., None]], dim=-1)


class FusedFMScorer(FusedMLPScorer):
    """FMModel and DeepFM through ``rankfast::mlp_score`` (and ``mlp_score_topk``), see
    :class:`_FMAdapter`: an :class:`FusedMLPScorer` whose user side carries the request's
    context. Training through the kernels does not cover them (``trains``)."""

    #: :func:`rankfast.scoring.trains_fused` refuses these models: they train eagerly.
    trains = False

    def __init__(self, model, users, history=None, lengths=None, context=None):
        self.model, self.device = model, users.device
        self.adapter = _FMAdapter(model)
        a, self.gu = self.adapter.users(users, context)
        self.a = scoring_terms(model, a)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        width = cfg.hidden[0] if isinstance(model, DeepFM) else 1
        side = (model.num_fields + 3) * (cfg.dim + 1) + _float32_elements(model, width)
        return Footprint(user=side, item=side, pair=1)


class _DCNAdapter:
    """A :class:`DCNv2` as arguments of ``rankfast::cross_score``: the request's field vectors
    (user, then context fields) and the item's as the row tables ``xu`` and ``xi`` the kernel
    assembles ``x0`` from, the cross layers and the output layer's two blocks as they are, and
    the deep network's first layer split into the request columns' term ``a`` (its bias
    included) and the item columns' term ``c``. The kernel only scores, so the split terms are
    always :func:`scoring_terms`."""

    def __init__(self, model: DCNv2):
        self.model = model
        width = model.cross[0].weight.shape[0]
        self.first, rest = (model.tower.linears[0], model.tower.linears[1:]) if model.tower is not None else (None, [])
        w_out = model.output.weight[0]
        self.layers = dict(
            cross_weights=[m.weight for m in model.cross],
            cross_biases=[m.bias for m in model.cross],
            w_cross=w_out[:width],
            weights=[m.weight for m in rest],
            biases=[m.bias for m in rest],
            w_deep=None if self.first is None else w_out[width:],
            b_out=model.output.bias,
            activation=model.config.activation,
        )

    @staticmethod
    def covers(model: RankingModel) -> bool:
        if not isinstance(model, DCNv2):
            return False
        cfg, width = model.config, model.cross[0].weight.shape[0]
        return (
            width <= cs.MAX_CROSS_WIDTH
            and cfg.cross_layers <= cs.max_cross_layers(width)
            and len(cfg.hidden) <= ms.MAX_LAYERS
            and max(cfg.hidden, default=0) <= MAX_WIDTH
        )

    def users(self, users, context=None) -> dict:
        """``xu [U, Du]`` (the request's fields, flattened) and the deep network's user term ``a``."""
        xu = self.model.request_fields(users, context).flatten(-2)
        a = None
        if self.first is not None:
            a = scoring_terms(self.model, split_term(xu, self.first.weight[:, : xu.shape[-1]], self.first.bias))
        return dict(xu=xu, a=a)

    def items(self, ids) -> dict:
        """``xi [..., Di]`` (the item's fields, flattened) and the deep network's item term ``c``."""
        xi = self.model.item_repr.per_field(ids).flatten(-2)
        c = None
        if self.first is not None:
            c = scoring_terms(self.model, split_term(xi, self.first.weight[:, -xi.shape[-1] :]))
        return dict(xi=xi, c=c)


class FusedDCNScorer(_FusedScorer):
    """DCNv2 through ``rankfast::cross_score`` (:class:`_DCNAdapter`), the request's context on
    the user side. The kernel has no top-K variant (``rankfast.score`` selects from the tiles'
    scores) and no backward (``trains``)."""

    op = staticmethod(cs.cross_score)
    max_fused_k = 0
    #: :func:`rankfast.scoring.trains_fused` refuses these models: they train eagerly.
    trains = False

    def __init__(self, model, users, history=None, lengths=None, context=None):
        self.model, self.device = model, users.device
        self.adapter = _DCNAdapter(model)
        self.user_side = self.adapter.users(users, context)

    def items(self, ids):
        rows, idx = _candidate_rows(ids, self.model.config.num_items)
        return self.adapter.items(rows), idx, ids.shape[-1]

    def _op_args(self, rows, state):
        item_side, idx, _ = state
        user_side = {name: None if t is None else t[rows] for name, t in self.user_side.items()}
        return dict(user_side, **item_side, idx=idx, **self.adapter.layers)

    @staticmethod
    def footprint(model, history_len: int):
        cfg = model.config
        item_width = (1 + sum(f.side == "item" for f in cfg.fields)) * cfg.dim
        request_width = (2 + len(cfg.fields)) * cfg.dim - item_width
        h1 = _float32_elements(model, cfg.hidden[0]) if cfg.hidden else 0
        return Footprint(user=request_width + h1, item=item_width + h1, pair=1)


class FusedRecommenderNetScorer(FusedMLPScorer):
    """RecommenderNet through ``rankfast::rating_score``: :class:`FusedMLPScorer`'s split terms
    and hidden layers, the class head and expected rating in the kernel. It has no top-K variant
    (``rankfast.score`` selects from the tiles' scores) and no backward (``trains``)."""

    op = staticmethod(rs.rating_score)
    max_fused_k = 0
    #: :func:`rankfast.scoring.trains_fused` refuses these models: they train eagerly.
    trains = False

    def _op_args(self, rows, state):
        item_side, idx, _ = state
        return dict(a=self.a[rows], c=item_side["c"], idx=idx, **self.adapter.layers)


# --- a model's scores in one call -----------------------------------------------------------


@dataclass(frozen=True)
class OpCall:
    """A model's scores as one op call: ``op(**kwargs)``. ``split_terms``: the float32 first-layer
    terms among the arguments; ``candidates``: the candidate item ids, ``[N]`` or ``[B, N]``."""

    op: Callable
    kwargs: dict
    split_terms: tuple
    candidates: torch.Tensor


def _check_ids(cfg, users, items, history=None, lengths=None):
    """Every id in range and every length in ``[0, L]``, at the cost of one device sync for all of
    them (the separate checks of ``rankfast._ids`` only run, for their message, when one fails)."""
    if torch.compiler.is_compiling():
        return
    flags = [((users < 0) | (users >= cfg.num_users)).any(), ((items < 0) | (items >= cfg.num_items)).any()]
    if history is not None:
        max_len = history.shape[1]
        flags.append(((lengths < 0) | (lengths > max_len)).any())
        valid = history_mask(lengths, max_len)
        flags.append((((history < 0) | (history >= cfg.num_items)) & valid).any())
    if bool(torch.stack(flags).any()):
        check_range("users", users, cfg.num_users)
        check_range("items", items, cfg.num_items)
        check_history(history, lengths, num_items=cfg.num_items)


def op_call(model: RankingModel, users, items=None, history=None, lengths=None, *, validate=True) -> OpCall:
    """``model``'s scores for ``users [B]`` against ``items`` (``None``: every item, ``[N]``
    shared, ``[B, N]`` per user) as an :class:`OpCall`, arguments checked as
    :func:`rankfast.score` checks them: ids and lengths with one device sync, or not at all
    with ``validate=False`` (ids the caller has checked, such as ``rankfast.fit``'s batches).
    The op is called without its own id checks (``check_ids=False``)."""
    if not isinstance(model, RankingModel):
        raise TypeError(f"model: expected a rankfast.models.RankingModel, got {type(model).__name__}")
    scorer = scorer_for(model)
    if scorer is None:
        raise ValueError(f"model: the fused kernels do not cover this {type(model).__name__} ({model.config})")
    cfg = model.config
    if model.training and cfg.dropout > 0 and torch.is_grad_enabled():
        raise ValueError("model: the fused kernels have no dropout; call model.eval() or use another backend")
    device = next(model.parameters()).device
    users = as_ids("users", users, device=device)
    if items is None:
        items = torch.arange(cfg.num_items, device=device)
    items = as_ids("items", items, ndims=(1, 2), device=device)
    if items.dim() == 2 and items.shape[0] != users.shape[0]:
        raise ValueError(f"items: per-user candidates must be [B={users.shape[0]}, N], got {tuple(items.shape)}")
    rows, idx = _candidate_rows(items, cfg.num_items)
    if scorer is FusedDCNScorer:
        if validate:
            _check_ids(cfg, users, items)
        adapter = _DCNAdapter(model)
        kw = dict(adapter.users(users), **adapter.items(rows), idx=idx, check_ids=False, **adapter.layers)
        return OpCall(cs.cross_score, kw, (kw["a"], kw["c"]), items)
    if issubclass(scorer, FusedMLPScorer):
        if validate:
            _check_ids(cfg, users, items)
        adapter = _FMAdapter(model) if scorer is FusedFMScorer else _MLPAdapter(model)
        (a, gu), (c, gi) = adapter.users(users), adapter.items(rows)
        a, c = scoring_terms(model, a), scoring_terms(model, c)
        kw = dict(a=a, c=c, idx=idx, check_ids=False, **adapter.layers)
        if scorer is not FusedRecommenderNetScorer:  # the class head has no GMF term
            kw.update(gu=gu, gi=gi)
        return OpCall(scorer.op, kw, (a, c), items)
    if history is None or lengths is None:
        raise ValueError("history, lengths: required by AttentionModel ([B, L] and [B])")
    history, lengths = check_history(
        history, lengths, num_items=cfg.num_items, rows=users.shape[0], device=device, check_values=False
    )
    if validate:
        _check_ids(cfg, users, items, history, lengths)
    adapter = _AttentionAdapter(model)
    user_side = _scoring_side(model, adapter.users(users, history, lengths))
    kw = dict(user_side, **_scoring_side(model, adapter.items(rows)), idx=idx, check_ids=False, **adapter.layers)
    return OpCall(ta.target_attention_score, kw, tuple(kw.get(name) for name in _SPLIT_TERMS), items)


def model_scores(model: RankingModel, users, items=None, history=None, lengths=None, *, precision=None):
    """Scores ``[B, N]`` of ``users [B]`` against ``items`` (``None``: every item, shared ``[N]``,
    or per-user ``[B, N]``) through one fused kernel; ``history [B, L]`` and ``lengths [B]`` for an
    :class:`AttentionModel`. Differentiable with respect to the model's parameters, except for
    a :class:`DCNv2` or :class:`RecommenderNet`, whose kernels only score (call them under
    ``torch.no_grad()``)."""
    call = op_call(model, users, items, history, lengths)
    return call.op(**call.kwargs, precision=precision)


def model_topk(
    model: RankingModel, users, items=None, history=None, lengths=None, *, k, exclude=None, splits=0, precision=None
):
    """Fused score + top-K: each user's best ``k`` candidates as ``(item ids, scores)``
    ``[B, min(k, N)]``, the rules of :func:`rankfast.score` with ``k`` (``k`` clamped to the ``N``
    candidates, ``exclude`` by item id, NaN last, ties to the earlier candidate, padding id -1 /
    score -inf; ``k`` up to ``rankfast.kernels.topk.MAX_K``). ``splits``: programs per user (0: automatic)."""
    if (scorer := scorer_for(model)) is not None and scorer.max_fused_k == 0:
        raise ValueError(
            f"model: {type(model).__name__} has no fused score + top-K; rankfast.score(..., k=) scores and selects it"
        )
    with torch.no_grad():
        call = op_call(model, users, items, history, lengths)
        candidates, num_users = call.candidates, call.kwargs["a"].shape[0]
        k = check_k(k, candidates.shape[-1])
        mask = None
        if exclude is not None:
            skip = excluded_positions(candidates, exclude_csr(exclude, num_users, model.config.num_items))
            mask = kernel_topk.positions_bitmask(*skip, num_users, candidates.shape[-1], candidates.device)
        op_topk = ms.mlp_score_topk if call.op is ms.mlp_score else ta.target_attention_topk
        positions, values = op_topk(**call.kwargs, k=k, exclude_mask=mask, splits=splits, precision=precision)
        return positions_to_ids(positions, candidates), values


def training_scores(model: RankingModel, users, items=None, history=None, lengths=None, *, validate=True):
    """Differentiable scores ``[B, W]`` of ``users [B]`` against per-user candidates
    ``items [B, W]``, shared ones ``[W]``, or every item (``None``) through the fused forward
    and backward kernels: what :func:`rankfast.fit` trains on when
    :func:`rankfast.scoring.trains_fused` says so. ``validate=False`` skips the id checks and
    their device sync (``fit`` passes its own batches, checked when the data was loaded).

    Under autocast (``TrainConfig.bf16``) the kernels' inputs are cast to the autocast dtype,
    as autocast would cast a matmul's, except the split first layers' terms, which stay
    float32 (see ``split_term``); gradients flow back to the parameters in their own dtype.
    """
    call = op_call(model, users, items, history, lengths, validate=validate)
    kw, device = call.kwargs, call.kwargs["a"].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        keep = {id(t) for t in call.split_terms if t is not None}

        def cast(t):
            low = isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in keep
            return t.to(dtype) if low else t

        kw = tree_map(cast, kw)
    with torch.autocast(device, enabled=False):
        return call.op(**kw)
