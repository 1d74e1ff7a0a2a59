"""Fused target-attention scoring (AttentionModel, DIN and "dot" kinds): forward.

Per user row and tile of ``BLOCK_N`` candidates, one program:

1. walks the user's valid history (``lengths[b]`` items) one item per step.
   DIN's activation unit over ``[h, q, h-q, h*q]`` splits as
   ``(Wh + Wd) h + (Wq - Wd) q + Wx (h*q)``: the history term ``HT [B, L, A1]``
   (unit bias included) and candidate term ``QT [M, A1]`` come precomputed,
   only ``(h*q) @ Wx^T`` runs per (pair, history item), on ``tl.dot`` over the
   tile's ``BLOCK_N`` (<= 128) candidate rows, in chunks of ``UJ`` of the
   unit's real width (80 units are 5 chunks of 16, not 128 padded ones), each
   chunk fed straight into the unit's second layer (the flash-MLP pattern), so
   no ``[rows, A1]`` tile is ever held. The "dot" kind uses ``<h, q> * scale``.
2. pools the history with a masked softmax computed online (running max,
   denominator and weighted sum, as in flash attention; the weighted sum in
   fp32), or with the raw logits as weights (DIN's ``normalize=False``). An
   empty history pools to zero.
3. runs the output MLP on ``[E_u; pooled; E_q]`` in the same pass, its first
   layer split as ``A_u + CQ_q + pooled @ Wp^T`` (see ``kernels/mlp_score.py``),
   on the same ``BLOCK_N`` rows (>= 64 for the benchmark shapes: wgmma).

Nothing per pair or per (pair, history item) reaches global memory. Weights
are read where they are (``nn.Linear`` layout; ``WX`` and ``WP`` are column
blocks of a wider layer, read with their row stride).

Backward (``rankfast::target_attention_backward``, registered as the op's
autograd), two kernels, each per user x candidate tile: the first
recomputes the pooled history (keeping the softmax's running max and
denominator) and backpropagates the output MLP to the gradient of the pooled
history, which it stores per pair with the softmax's state; the second walks
the history again: softmax backward ``ds = p * (dpooled . h - dpooled .
pooled)`` (or the raw-weight version), the DIN unit's backward from the
forward's second-layer accumulator (or the dot's). (One kernel holding both
needed more than 255 registers per thread.) Like the MLP backward they use no
atomics: programs are ``G`` user groups x ``C`` candidate groups
(``_common.ownership``), each adding into its own slots (weights; user rows
``[C, B, ...]``; candidate rows ``[G, N, ...]`` or per pair), summed in a
fixed order afterwards. Nothing per (pair, history item) is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfast.kernels import topk as topk_mod
from rankfast.kernels._common import (
    INTERPRET,
    MAX_WIDTH,
    accumulate,
    act_fn,
    act_grad,
    cast,
    check_activation,
    check_device,
    check_dtype,
    check_index,
    check_index_layout,
    check_precision,
    check_split_term,
    configs,
    default_precision,
    dot,
    item_rows,
    mul,
    ownership,
    pad_width,
    programs,
    weight_arg,
)
from rankfast.kernels.mlp_score import (
    MAX_LAYERS,
    _Layers,
    _mlp_pairs,
    _n_key,
    _tail_bwd,
    _to_rows,
    _vec,
)
from rankfast.kernels.topk import excluded, merge, store_keys, tile_keys

KINDS = {"din": 0, "dot": 1}
MAX_UNIT_LAYERS = 3


def _configs():
    """``BLOCK_N``: candidate rows per program (the unit's and the output MLP's dot M);
    ``UJ``: the unit's first-layer chunk."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "UJ": 16, "BJ": 16}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_N": bn, "UJ": uj, "BJ": bj}, num_warps=w, num_stages=2)
        for bn, uj, bj, w in ((128, 16, 64, 8), (64, 16, 64, 4), (32, 16, 32, 4), (16, 16, 32, 4))
    ]
    return configs(out, out[0])


def _bwd_configs():
    """The backward's two kernels: 64 candidate rows on 8 warps and the unit in chunks of 16 are
    what compiles without spills for the benchmark's DIN (bench/kernel_report.py); smaller tiles
    for fewer candidates."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "UJ": 16, "BJ": 16}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_N": bn, "UJ": 16, "BJ": 16}, num_warps=w, num_stages=2)
        for bn, w in ((64, 8), (32, 4), (16, 4))
    ]
    return configs(out, out[0])


def _fitting(configs, named_args, **kwargs):
    """The candidate tiles worth trying for ``N`` candidates: from ``min(64, N)`` (rounded up to
    a power of two) to ``max(16, N)``; the smallest config when none fits."""
    n = triton.next_power_of_2(max(1, int(named_args["N"])))
    out = [c for c in configs if min(64, n) <= c.kwargs["BLOCK_N"] <= max(16, n)]
    return out or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_KEY = ["N_KEY", "KIND", "NORMALIZE", "NU", "DP", "A2P", "A3P", "NL", "H1P", "H2P", "H3P", "H4P", "ACT", "HAS_IDX"]


@triton.jit
def _ux(WX, cj, dd, A1, D, stride_wx):
    """``WX[cj, :]^T``: ``[DP, UJ]`` of the unit's h*q block ``[A1, D]`` (row stride ``stride_wx``)."""
    return tl.load(
        WX + cj[None, :] * stride_wx + dd[:, None],
        mask=(cj[None, :] < A1) & (dd[:, None] < D),
        other=0.0,
        eviction_policy="evict_last",
    )


@triton.jit
def _unit_chunk(x, qt_row, ht, nmask, WX, cj, dd, A1, D, stride_wx, PREC: tl.constexpr):
    """The unit's first layer for units ``cj`` on the tile's rows: ``(z1, Wx chunk)``, z1
    ``[BLOCK_N, UJ]`` fp32 = ``x @ Wx[cj]^T + QT[item, cj] + HT[b, l, cj]``."""
    mj = cj < A1
    wx = _ux(WX, cj, dd, A1, D, stride_wx)
    qt = tl.load(qt_row[:, None] + cj[None, :], mask=nmask[:, None] & mj[None, :], other=0.0).to(tl.float32)
    htc = tl.load(ht + cj, mask=mj, other=0.0).to(tl.float32)
    return dot(x, wx, PREC=PREC) + qt + htc[None, :], wx


@triton.jit
def _unit(
    q,
    h,
    qt_row,
    ht,
    nmask,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    D,
    A1,
    A2,
    A3,
    stride_wx,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """DIN activation unit of one history item ``h [DP]`` against the tile's candidates
    ``q [BLOCK_N, DP]``: ``(logits [BLOCK_N], acc2)`` fp32, ``acc2`` the second layer's
    pre-activation without its bias (the backward starts from it). ``ht``: the item's row of
    the history term."""
    dd = tl.arange(0, DP)
    x = mul(q, h[None, :])  # in the inputs' dtype, as the model computes h * q
    c2 = tl.arange(0, A2P)
    acc2 = tl.zeros([BLOCK_N, A2P], dtype=tl.float32)
    logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, A1, UJ):
        cj = j + tl.arange(0, UJ)
        z1, _ = _unit_chunk(x, qt_row, ht, nmask, WX, cj, dd, A1, D, stride_wx, PREC)
        a1 = act_fn(z1, ACT)
        if NU >= 2:
            w2 = tl.load(
                UW2 + c2[None, :] * A1 + cj[:, None],
                mask=(c2[None, :] < A2) & (cj[:, None] < A1),
                other=0.0,
                eviction_policy="evict_last",
            )
            acc2 = dot(cast(a1, w2.dtype), w2, acc2, PREC=PREC)
        else:
            logit += tl.sum(a1 * _vec(UWO, cj, A1)[None, :], axis=1)
    if NU >= 2:
        a2 = act_fn(acc2 + _vec(UB2, c2, A2)[None, :], ACT)
        if NU == 3:
            c3 = tl.arange(0, A3P)
            w3 = tl.load(UW3 + c3[None, :] * A2 + c2[:, None], mask=(c3[None, :] < A3) & (c2[:, None] < A2), other=0.0)
            a3 = act_fn(dot(cast(a2, w3.dtype), w3, PREC=PREC) + _vec(UB3, c3, A3)[None, :], ACT)
            logit = tl.sum(a3 * _vec(UWO, c3, A3)[None, :], axis=1)
        else:
            logit = tl.sum(a2 * _vec(UWO, c2, A2)[None, :], axis=1)
    return logit + tl.load(UBO).to(tl.float32), acc2


@triton.jit
def _pool(
    b64,
    item,
    nmask,
    LENS,
    HIST,
    HT,
    Q,
    QT,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    D,
    A1,
    A2,
    A3,
    stride_wx,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    scale,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The pooled history of user ``b`` for each candidate of the tile: ``([BLOCK_N, DP] fp32,
    running max, denominator)``. One history item per step; the weighted sum is fp32, so the
    backward's ``d pooled . pooled`` equals ``sum_l p_l (d pooled . h_l)`` for the softmax
    gradient's own ``p`` (the logits' gradients then sum to zero, as they must)."""
    dd = tl.arange(0, DP)
    dmask = dd < D
    q = tl.load(Q + item[:, None] * stride_q + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    qt_row = QT + item * stride_qt
    length = tl.load(LENS + b64).to(tl.int32)
    acc = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_N], dtype=tl.float32)
    for item_l in range(0, length):
        h = tl.load(HIST + b64 * stride_hb + item_l * stride_hl + dd, mask=dmask, other=0.0)
        if KIND == 0:
            logit, _ = _unit(
                q,
                h,
                qt_row,
                HT + b64 * stride_tb + item_l * stride_tl,
                nmask,
                WX,
                UW2,
                UB2,
                UW3,
                UB3,
                UWO,
                UBO,
                D,
                A1,
                A2,
                A3,
                stride_wx,
                NU,
                DP,
                A2P,
                A3P,
                BLOCK_N,
                UJ,
                ACT,
                PREC,
            )
        else:
            logit = tl.sum(q.to(tl.float32) * h.to(tl.float32)[None, :], axis=1) * scale
        hf = h.to(tl.float32)
        if NORMALIZE:
            m_new = tl.maximum(m, logit)
            alpha = tl.exp(m - m_new)
            p = tl.exp(logit - m_new)
            denom = denom * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * hf[None, :]
            m = m_new
        else:
            acc += logit[:, None] * hf[None, :]
    if NORMALIZE:
        acc = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    return acc, m, denom


@triton.jit
def _attn_scores(
    b64,
    item,
    nmask,
    A,
    CQ,
    WP,
    stride_a,
    stride_cq,
    stride_wp,
    LENS,
    HIST,
    HT,
    Q,
    QT,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    D,
    A1,
    A2,
    A3,
    stride_wx,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    scale,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
    H1,
    H2,
    H3,
    H4,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    NL: tl.constexpr,
    H2P: tl.constexpr,
    H4P: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """The score of user ``b64``'s candidates ``item`` without the output bias, ``[BLOCK_N]``
    fp32: the history pooled by attention, then the output MLP on the split first layer's user
    and candidate rows and the pooled history; what the score kernel stores and its top-K
    twin ranks."""
    pooled, _, _ = _pool(
        b64,
        item,
        nmask,
        LENS,
        HIST,
        HT,
        Q,
        QT,
        WX,
        UW2,
        UB2,
        UW3,
        UB3,
        UWO,
        UBO,
        D,
        A1,
        A2,
        A3,
        stride_wx,
        stride_hb,
        stride_hl,
        stride_tb,
        stride_tl,
        stride_q,
        stride_qt,
        scale,
        KIND,
        NORMALIZE,
        NU,
        DP,
        A2P,
        A3P,
        BLOCK_N,
        UJ,
        ACT,
        PREC,
    )
    return _mlp_pairs(
        A + b64 * stride_a + tl.zeros([BLOCK_N], dtype=tl.int64),
        CQ + item * stride_cq,
        nmask,
        H1,
        H2,
        H3,
        H4,
        D,
        stride_wp,
        pooled,
        WP,
        True,
        W2,
        B2,
        W3,
        B3,
        W4,
        B4,
        WO,
        NL,
        H2P,
        H4P,
        BJ1,
        BJ3,
        BLOCK_N,
        ACT,
        PREC,
    )


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _fitting})
@triton.heuristics({"BJ1": lambda a: min(a["BJ"], a["H1P"]), "BJ3": lambda a: min(a["BJ"], a["H3P"])})
@triton.jit
def _attn_fwd_kernel(
    HIST,
    HT,
    LENS,
    Q,
    QT,
    CQ,
    IDX,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    A,
    WP,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    BO,
    OUT,
    B,
    N,
    D,
    A1,
    A2,
    A3,
    H1,
    H2,
    H3,
    H4,
    scale,
    stride_wx,
    stride_wp,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    stride_cq,
    stride_a,
    stride_ib,
    stride_in,
    stride_ob,
    N_KEY,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    b64 = (pid // num_n).to(tl.int64)
    n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
    score = _attn_scores(
        b64,
        item,
        nmask,
        A,
        CQ,
        WP,
        stride_a,
        stride_cq,
        stride_wp,
        LENS,
        HIST,
        HT,
        Q,
        QT,
        WX,
        UW2,
        UB2,
        UW3,
        UB3,
        UWO,
        UBO,
        D,
        A1,
        A2,
        A3,
        stride_wx,
        stride_hb,
        stride_hl,
        stride_tb,
        stride_tl,
        stride_q,
        stride_qt,
        scale,
        KIND,
        NORMALIZE,
        NU,
        DP,
        A2P,
        A3P,
        BLOCK_N,
        UJ,
        ACT,
        PREC,
        H1,
        H2,
        H3,
        H4,
        W2,
        B2,
        W3,
        B3,
        W4,
        B4,
        WO,
        NL,
        H2P,
        H4P,
        BJ1,
        BJ3,
    )
    score += tl.load(BO).to(tl.float32)
    tl.store(OUT + b64 * stride_ob + n, cast(score, OUT.dtype.element_ty), mask=nmask)


def _topk_configs():
    """``BLOCK_N``: candidates scored per step, merged into the running list of ``R >= BLOCK_N``
    (64 rows on 8 warps: spill-free beside the running list; 128 rows or 4 warps spill,
    bench/kernel_report.py)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "UJ": 16, "BJ": 16}, num_warps=4, num_stages=1)]
    out = [triton.Config({"BLOCK_N": 64, "UJ": 16, "BJ": 64}, num_warps=8, num_stages=2)]
    return configs(out, out[0])


@triton.autotune(configs=_topk_configs(), key=_KEY + ["HAS_EXCL", "R"])
@triton.heuristics({"BJ1": lambda a: min(a["BJ"], a["H1P"]), "BJ3": lambda a: min(a["BJ"], a["H3P"])})
@triton.jit
def _attn_topk_kernel(
    HIST,
    HT,
    LENS,
    Q,
    QT,
    CQ,
    IDX,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    A,
    WP,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    BO,
    EXCL,
    OUT_KEYS,
    B,
    N,
    D,
    A1,
    A2,
    A3,
    H1,
    H2,
    H3,
    H4,
    K,
    CHUNK,
    scale,
    stride_wx,
    stride_wp,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    stride_cq,
    stride_a,
    stride_ib,
    stride_in,
    stride_e,
    N_KEY,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    PREC: tl.constexpr,
    R: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """Score + top-K: program (user b, split s) scores candidates [s * CHUNK, (s + 1) * CHUNK) in
    tiles of BLOCK_N, merged into its best R."""
    pid = tl.program_id(0)
    b64 = (pid // SPLITS).to(tl.int64)
    start = (pid % SPLITS) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    bo = tl.load(BO).to(tl.float32)
    running = tl.full([R], -(2**63), dtype=tl.int64)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
        score = _attn_scores(
            b64,
            item,
            nmask,
            A,
            CQ,
            WP,
            stride_a,
            stride_cq,
            stride_wp,
            LENS,
            HIST,
            HT,
            Q,
            QT,
            WX,
            UW2,
            UB2,
            UW3,
            UB3,
            UWO,
            UBO,
            D,
            A1,
            A2,
            A3,
            stride_wx,
            stride_hb,
            stride_hl,
            stride_tb,
            stride_tl,
            stride_q,
            stride_qt,
            scale,
            KIND,
            NORMALIZE,
            NU,
            DP,
            A2P,
            A3P,
            BLOCK_N,
            UJ,
            ACT,
            PREC,
            H1,
            H2,
            H3,
            H4,
            W2,
            B2,
            W3,
            B3,
            W4,
            B4,
            WO,
            NL,
            H2P,
            H4P,
            BJ1,
            BJ3,
        )
        score = cast(score + bo, HIST.dtype.element_ty).to(tl.float32)
        eligible = nmask & (~excluded(EXCL, b64, stride_e, n, nmask, HAS_EXCL))
        running = merge(running, tile_keys(score, n, eligible))
    store_keys(running, OUT_KEYS, pid, K, R)


@triton.jit
def _unit_bwd(
    q,
    h,
    qt_row,
    ht,
    nmask,
    ds,
    acc2,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    DWX,
    DUW2,
    DUB2,
    DUW3,
    DUB3,
    DUWO,
    DUBO,
    DQT,
    DHT,
    D,
    A1,
    A2,
    A3,
    stride_wx,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of the DIN unit for one history item given ``ds = d logit [BLOCK_N]`` and the
    forward's second-layer accumulator ``acc2`` (see ``_unit``): adds the
    unit's weight gradients (``nn.Linear`` layout) into this program's slots, the candidate-term
    gradient into the candidates' rows ``DQT [BLOCK_N] + cols`` and the history-term gradient into
    ``DHT`` (the item's row); returns ``(dq [BLOCK_N, DP], dh [DP])``, the h*q term's gradients.
    Weight gradients are ``dz^T @ activation`` (the dot's M is a width: wgmma)."""
    dd = tl.arange(0, DP)
    x = mul(q, h[None, :])
    c2 = tl.arange(0, A2P)
    m2 = c2 < A2
    accumulate(DUBO, tl.sum(ds, axis=0))
    if NU >= 2:
        # Step 1: the layers after the first, from the forward's acc2, backpropagated to dz2.
        z2 = acc2 + _vec(UB2, c2, A2)[None, :]
        a2 = act_fn(z2, ACT)
        if NU == 3:
            c3 = tl.arange(0, A3P)
            m3 = c3 < A3
            w3 = tl.load(UW3 + c3[None, :] * A2 + c2[:, None], mask=m3[None, :] & m2[:, None], other=0.0)
            a2c = cast(a2, w3.dtype)
            z3 = dot(a2c, w3, PREC=PREC) + _vec(UB3, c3, A3)[None, :]
            accumulate(DUWO + c3, tl.sum(act_fn(z3, ACT) * ds[:, None], axis=0), m3)
            dz3 = ds[:, None] * _vec(UWO, c3, A3)[None, :] * act_grad(z3, ACT)
            accumulate(DUB3 + c3, tl.sum(dz3, axis=0), m3)
            dz3c = cast(dz3, w3.dtype)
            dw3 = dot(tl.trans(dz3c), a2c, PREC=PREC)  # [A3P, A2P] = DUW3
            accumulate(DUW3 + c3[:, None] * A2 + c2[None, :], dw3, m3[:, None] & m2[None, :])
            da2 = dot(dz3c, tl.trans(w3), PREC=PREC)
        else:
            accumulate(DUWO + c2, tl.sum(a2 * ds[:, None], axis=0), m2)
            da2 = ds[:, None] * _vec(UWO, c2, A2)[None, :]
        dz2 = da2 * act_grad(z2, ACT)
        accumulate(DUB2 + c2, tl.sum(dz2, axis=0), m2)
        dz2c = cast(dz2, UW2.dtype.element_ty)
    # Step 2: per chunk of the first layer, recompute it, add DUW2's columns, backpropagate to
    # dz1: the rows of the candidate term, the row of the history term, DWX and the h*q term.
    dx = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    for j in range(0, A1, UJ):
        cj = j + tl.arange(0, UJ)
        mj = cj < A1
        z1, wx = _unit_chunk(x, qt_row, ht, nmask, WX, cj, dd, A1, D, stride_wx, PREC)
        a1 = act_fn(z1, ACT)
        if NU >= 2:
            w2 = tl.load(UW2 + c2[None, :] * A1 + cj[:, None], mask=m2[None, :] & mj[:, None], other=0.0)
            dw2 = dot(tl.trans(dz2c), cast(a1, w2.dtype), PREC=PREC)  # [A2P, UJ] = DUW2[:, cj]
            accumulate(DUW2 + c2[:, None] * A1 + cj[None, :], dw2, m2[:, None] & mj[None, :])
            da1 = dot(dz2c, tl.trans(w2), PREC=PREC)
        else:
            accumulate(DUWO + cj, tl.sum(a1 * ds[:, None], axis=0), mj)
            da1 = ds[:, None] * _vec(UWO, cj, A1)[None, :]
        dz1 = da1 * act_grad(z1, ACT)
        dz1c = cast(dz1, wx.dtype)
        dwx = dot(tl.trans(x), dz1c, PREC=PREC)  # [DP, UJ] = DWX[cj, :]^T
        accumulate(DWX + cj[None, :] * D + dd[:, None], dwx, mj[None, :] & (dd[:, None] < D))
        dx = dot(dz1c, tl.trans(wx), dx, PREC=PREC)
        accumulate(DQT[:, None] + cj[None, :], dz1, nmask[:, None] & mj[None, :])
        accumulate(DHT + cj, tl.sum(dz1, axis=0), mj)
    return dx * h.to(tl.float32)[None, :], tl.sum(dx * q.to(tl.float32), axis=0)


@triton.autotune(
    configs=_bwd_configs(),
    key=_KEY + ["SHARED"],
    prune_configs_by={"early_config_prune": _fitting},
    reset_to_zero=["DA", "DCQ", "DWP", "DW2", "DB2", "DW3", "DB3", "DW4", "DB4", "DWO", "DBO"],
)
@triton.heuristics({"BJ1": lambda a: min(a["BJ"], a["H1P"]), "BJ3": lambda a: min(a["BJ"], a["H3P"])})
@triton.jit
def _attn_bwd_tail_kernel(
    HIST,
    HT,
    LENS,
    Q,
    QT,
    CQ,
    IDX,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    A,
    WP,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    BO,
    GOUT,
    DPOOLED,
    STATS,
    DCQ,
    DA,
    DWP,
    DW2,
    DB2,
    DW3,
    DB3,
    DW4,
    DB4,
    DWO,
    DBO,
    B,
    N,
    D,
    A1,
    A2,
    A3,
    H1,
    H2,
    H3,
    H4,
    HL,
    GROUPS_U,
    GROUPS_N,
    scale,
    stride_wx,
    stride_wp,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    stride_cq,
    stride_a,
    stride_ib,
    stride_in,
    stride_go,
    N_KEY,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SHARED: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """The backward's first half. Program ``(g, c)`` of ``GROUPS_U x GROUPS_N`` takes the (user b,
    candidate tile t) work items with b in ``g, g + GROUPS_U, ...`` and t in ``c, c + GROUPS_N,
    ...``: recomputes the pooled history, backpropagates the output MLP (its weights into this
    program's slots, the user term's rows into ``DA [GROUPS_N, B, H1]``, the candidate term's into
    ``DCQ``: ``[GROUPS_U, N, H1]`` or per pair), and stores, per pair, the gradient of the pooled
    history ``DPOOLED [B, N, DP]`` and ``STATS [B, N, 3]``: the softmax's running max, its
    denominator's inverse and ``d pooled . pooled``, which the history walk
    (``_attn_bwd_hist_kernel``) starts from. No atomics; the host sums the slots."""
    pid = tl.program_id(0)
    g = pid // GROUPS_N
    c = pid % GROUPS_N
    slot = pid.to(tl.int64)
    DWP += slot * (H1 * D)
    DW2 += slot * (H2 * H1)
    DB2 += slot * H2
    DW3 += slot * (H3 * H2)
    DB3 += slot * H3
    DW4 += slot * (H4 * H3)
    DB4 += slot * H4
    DWO += slot * HL
    DBO += slot
    DA += c.to(tl.int64) * B * H1
    if SHARED:
        DCQ += g.to(tl.int64) * N * H1
    dd = tl.arange(0, DP)
    for b in range(g, B, GROUPS_U):
        for t in range(c, tl.cdiv(N, BLOCK_N), GROUPS_N):
            tl.debug_barrier()  # the previous work item's slot updates are visible to every thread
            # Step 1: recompute the pooled history (and the softmax's max and denominator).
            b64 = tl.cast(b, tl.int64)
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < N
            item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
            pooled, m, denom = _pool(
                b64,
                item,
                nmask,
                LENS,
                HIST,
                HT,
                Q,
                QT,
                WX,
                UW2,
                UB2,
                UW3,
                UB3,
                UWO,
                UBO,
                D,
                A1,
                A2,
                A3,
                stride_wx,
                stride_hb,
                stride_hl,
                stride_tb,
                stride_tl,
                stride_q,
                stride_qt,
                scale,
                KIND,
                NORMALIZE,
                NU,
                DP,
                A2P,
                A3P,
                BLOCK_N,
                UJ,
                ACT,
                PREC,
            )
            # Step 2: the output MLP's backward: its weights, the user term's row, the candidate
            # term's rows, and the gradient of the pooled history.
            go = tl.load(GOUT + b64 * stride_go + n, mask=nmask, other=0.0).to(tl.float32)
            accumulate(DBO, tl.sum(go, axis=0))
            u64 = b64 + tl.zeros([BLOCK_N], dtype=tl.int64)
            dpooled = _tail_bwd(
                A + u64 * stride_a,
                CQ + item * stride_cq,
                nmask,
                u64,
                n,
                item,
                go,
                H1,
                H2,
                H3,
                H4,
                D,
                stride_wp,
                pooled,
                WP,
                DWP,
                True,
                W2,
                B2,
                W3,
                B3,
                W4,
                B4,
                WO,
                DA,
                DCQ,
                DW2,
                DB2,
                DW3,
                DB3,
                DW4,
                DB4,
                DWO,
                b,
                t,
                B,
                N,
                IDX,
                stride_ib,
                stride_in,
                NL,
                H2P,
                H4P,
                DP,
                BJ1,
                BJ3,
                BLOCK_N,
                1,
                BLOCK_N,
                HAS_IDX,
                SHARED,
                ACT,
                PREC,
            )
            # Step 3: what the history walk needs, per pair.
            pair = b64 * N + n
            tl.store(DPOOLED + pair[:, None] * DP + dd[None, :], dpooled, mask=nmask[:, None])
            inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)
            tl.store(STATS + pair * 3, m, mask=nmask)
            tl.store(STATS + pair * 3 + 1, inv, mask=nmask)
            tl.store(STATS + pair * 3 + 2, tl.sum(dpooled * pooled, axis=1), mask=nmask)


@triton.autotune(
    configs=_bwd_configs(),
    key=_KEY + ["SHARED"],
    prune_configs_by={"early_config_prune": _fitting},
    reset_to_zero=["DHIST", "DHT", "DQ", "DQT", "DWX", "DUW2", "DUB2", "DUW3", "DUB3", "DUWO", "DUBO"],
)
@triton.jit
def _attn_bwd_hist_kernel(
    HIST,
    HT,
    LENS,
    Q,
    QT,
    IDX,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    DPOOLED,
    STATS,
    DHIST,
    DHT,
    DQ,
    DQT,
    DWX,
    DUW2,
    DUB2,
    DUW3,
    DUB3,
    DUWO,
    DUBO,
    B,
    N,
    L,
    D,
    A1,
    A2,
    A3,
    AL,
    GROUPS_U,
    GROUPS_N,
    scale,
    stride_wx,
    stride_hb,
    stride_hl,
    stride_tb,
    stride_tl,
    stride_q,
    stride_qt,
    stride_ib,
    stride_in,
    N_KEY,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SHARED: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UJ: tl.constexpr,
    BJ: tl.constexpr,
):
    """The backward's second half: per work item (as ``_attn_bwd_tail_kernel``), walks the history
    again from ``DPOOLED`` and ``STATS``: the softmax's (or raw weights') backward to the logits,
    then the DIN unit's (or the dot's) backward. Adds the unit's weight gradients into this
    program's slots, the history rows ``DHIST``, ``DHT`` ``[GROUPS_N, B, L, .]`` and the candidate
    rows ``DQ``, ``DQT`` (``[GROUPS_U, N, .]`` or per pair). No atomics."""
    pid = tl.program_id(0)
    g = pid // GROUPS_N
    c = pid % GROUPS_N
    slot = pid.to(tl.int64)
    DWX += slot * (A1 * D)
    DUW2 += slot * (A2 * A1)
    DUB2 += slot * A2
    DUW3 += slot * (A3 * A2)
    DUB3 += slot * A3
    DUWO += slot * AL
    DUBO += slot
    user_slot = c.to(tl.int64) * B
    DHIST += user_slot * (L * D)
    DHT += user_slot * (L * A1)
    if SHARED:
        DQ += g.to(tl.int64) * N * D
        DQT += g.to(tl.int64) * N * A1
    dd = tl.arange(0, DP)
    dmask = dd < D
    for b in range(g, B, GROUPS_U):
        for t in range(c, tl.cdiv(N, BLOCK_N), GROUPS_N):
            tl.debug_barrier()  # the previous work item's slot updates are visible to every thread
            b64 = tl.cast(b, tl.int64)
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < N
            item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
            pair = b64 * N + n
            dpooled = tl.load(DPOOLED + pair[:, None] * DP + dd[None, :], mask=nmask[:, None], other=0.0)
            m = tl.load(STATS + pair * 3, mask=nmask, other=0.0)
            inv = tl.load(STATS + pair * 3 + 1, mask=nmask, other=0.0)
            delta = tl.load(STATS + pair * 3 + 2, mask=nmask, other=0.0)
            q = tl.load(Q + item[:, None] * stride_q + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            q32 = q.to(tl.float32)
            cand = n.to(tl.int64) if SHARED else pair
            dq = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
            length = tl.load(LENS + b64).to(tl.int32)
            for item_l in range(0, length):
                tl.debug_barrier()  # the previous item's slot updates are visible to every thread
                # Step 1: the item's logits (the unit recomputed), the softmax's backward to them.
                h = tl.load(HIST + b64 * stride_hb + item_l * stride_hl + dd, mask=dmask, other=0.0)
                hf = h.to(tl.float32)
                ht = HT + b64 * stride_tb + item_l * stride_tl
                if KIND == 0:
                    logit, acc2 = _unit(
                        q,
                        h,
                        QT + item * stride_qt,
                        ht,
                        nmask,
                        WX,
                        UW2,
                        UB2,
                        UW3,
                        UB3,
                        UWO,
                        UBO,
                        D,
                        A1,
                        A2,
                        A3,
                        stride_wx,
                        NU,
                        DP,
                        A2P,
                        A3P,
                        BLOCK_N,
                        UJ,
                        ACT,
                        PREC,
                    )
                else:
                    logit = tl.sum(q32 * hf[None, :], axis=1) * scale
                dp = tl.sum(dpooled * hf[None, :], axis=1)  # d pooled . h_l, [BLOCK_N]
                if NORMALIZE:
                    p = tl.where(nmask, tl.exp(logit - m) * inv, 0.0)
                    ds = p * (dp - delta)
                    dh = tl.sum(p[:, None] * dpooled, axis=0)
                else:
                    w = tl.where(nmask, logit, 0.0)
                    ds = tl.where(nmask, dp, 0.0)
                    dh = tl.sum(w[:, None] * dpooled, axis=0)
                # Step 2: the unit's (or the dot's) backward; the history row's gradient.
                if KIND == 0:
                    dq_l, dh_l = _unit_bwd(
                        q,
                        h,
                        QT + item * stride_qt,
                        ht,
                        nmask,
                        ds,
                        acc2,
                        WX,
                        UW2,
                        UB2,
                        UW3,
                        UB3,
                        UWO,
                        DWX,
                        DUW2,
                        DUB2,
                        DUW3,
                        DUB3,
                        DUWO,
                        DUBO,
                        DQT + cand * A1,
                        DHT + (b64 * L + item_l) * A1,
                        D,
                        A1,
                        A2,
                        A3,
                        stride_wx,
                        NU,
                        DP,
                        A2P,
                        A3P,
                        BLOCK_N,
                        UJ,
                        ACT,
                        PREC,
                    )
                    dq += dq_l
                    dh += dh_l
                else:
                    dq += ds[:, None] * hf[None, :] * scale
                    dh += tl.sum(ds[:, None] * q32, axis=0) * scale
                accumulate(DHIST + (b64 * L + item_l) * D + dd, dh, dmask)
            accumulate(DQ + cand[:, None] * D + dd[None, :], dq, nmask[:, None] & dmask[None, :])


# --- host side -----------------------------------------------------------------------


def _prepare(
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    activation,
    precision,
):
    """Checks the op's inputs (shapes, dtypes, devices: no values, which would need a device
    sync; see ``target_attention_score``); returns the launch constants and weight arguments."""
    act = check_activation(activation)
    check_precision(precision)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    check_dtype("hist", hist)
    dtype, device = hist.dtype, hist.device
    if hist.dim() != 3:
        raise ValueError(f"hist: expected [B, L, D], got {tuple(hist.shape)}")
    B, L, D = hist.shape
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths: expected int [B={B}], got {tuple(lengths.shape)} {lengths.dtype}")
    check_device("lengths", lengths, device)
    if q.dim() != 2 or q.shape[1] != D:
        raise ValueError(f"q: expected [M, D={D}], got {tuple(q.shape)}")
    if a.dim() != 2 or cq.dim() != 2 or a.shape[0] != B or cq.shape[0] != q.shape[0] or a.shape[1] != cq.shape[1]:
        raise ValueError(
            f"a, cq: expected [B={B}, H1] and [M={q.shape[0]}, H1], got {tuple(a.shape)}, {tuple(cq.shape)}"
        )
    if wp.shape != (a.shape[1], D) or wp.stride(-1) != 1:
        raise ValueError(f"wp: expected [H1={a.shape[1]}, D={D}] with unit column stride, got {tuple(wp.shape)}")
    check_dtype("q", q, dtype)
    for name, t in (("cq", cq), ("a", a)):
        check_split_term(name, t, dtype)
    for name, t in (("q", q), ("cq", cq), ("a", a), ("wp", wp)):
        check_device(name, t, device)
    check_index_layout(idx, B, device)
    if not 1 <= len(weights) + 1 <= MAX_LAYERS or len(biases) != len(weights):
        raise ValueError(f"weights: expected 0..{MAX_LAYERS - 1} output-MLP layers after the first, one bias each")
    widths = [a.shape[1]]
    for i, (w, bb) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != widths[-1] or bb.shape != (w.shape[0],):
            raise ValueError(f"weights[{i}]: expected [H, {widths[-1]}] with bias [H], got {tuple(w.shape)}")
        widths.append(w.shape[0])
    if max(widths) > MAX_WIDTH or D > MAX_WIDTH:
        raise ValueError(f"weights: widths up to {MAX_WIDTH} are supported, got {widths} (D={D})")
    if w_out.shape != (widths[-1],) or b_out.numel() != 1:
        raise ValueError(
            f"w_out, b_out: expected [{widths[-1]}] and one element, got {tuple(w_out.shape)}, {tuple(b_out.shape)}"
        )
    k = {"act": act, "dp": pad_width(D), "tail": _Layers(a, weights, biases, w_out, b_out, None)}
    k["wp"] = wp.detach()
    if kind == "din":
        if wx is None or qt is None or ht is None or unit_w_out is None or unit_b_out is None:
            raise ValueError("wx, ht, qt, unit_w_out, unit_b_out: required for kind='din'")
        a1 = wx.shape[0]
        if wx.shape != (a1, D) or wx.stride(-1) != 1 or ht.shape != (B, L, a1) or qt.shape != (q.shape[0], a1):
            raise ValueError(
                f"wx, ht, qt: expected [A1, D={D}] (unit column stride), [B, L, A1], [M, A1], got "
                f"{tuple(wx.shape)}, {tuple(ht.shape)}, {tuple(qt.shape)}"
            )
        check_split_term("ht", ht, dtype)
        check_split_term("qt", qt, dtype)
        if len(unit_biases) != len(unit_weights):
            raise ValueError(f"unit_biases: expected one per unit weight ({len(unit_weights)}), got {len(unit_biases)}")
        uwidths = [a1]
        for i, (w, bb) in enumerate(zip(unit_weights, unit_biases, strict=True)):
            if w.dim() != 2 or w.shape[1] != uwidths[-1] or bb.shape != (w.shape[0],):
                raise ValueError(f"unit_weights[{i}]: expected [A, {uwidths[-1]}] with bias [A], got {tuple(w.shape)}")
            uwidths.append(w.shape[0])
        if len(uwidths) > MAX_UNIT_LAYERS or max(uwidths) > MAX_WIDTH:
            raise ValueError(f"unit_weights: 1..{MAX_UNIT_LAYERS} unit layers of width <= {MAX_WIDTH}, got {uwidths}")
        if unit_w_out.shape != (uwidths[-1],):
            raise ValueError(f"unit_w_out: expected [{uwidths[-1]}], got {tuple(unit_w_out.shape)}")
        absent = MAX_UNIT_LAYERS - len(uwidths)
        uwo = weight_arg(unit_w_out)
        k["uw"] = [weight_arg(w) for w in unit_weights] + [uwo] * absent
        k["ub"] = [weight_arg(bb) for bb in unit_biases] + [uwo] * absent
        k["uwo"], k["ubo"], k["wx"] = uwo, weight_arg(unit_b_out).reshape(1), wx.detach()
        k["uwidths"], k["nu"] = uwidths + [1] * absent, len(uwidths)
    else:
        k["uw"], k["ub"], k["uwo"], k["ubo"], k["wx"] = [hist] * 2, [hist] * 2, hist, hist, hist
        k["uwidths"], k["nu"] = [0, 1, 1], 1
    return k


def _launch(hist, ht, lengths, q, qt, cq, idx, a, k):
    """Contiguous tensors, candidate strides and shape constants shared by the kernels."""
    B, L, D = hist.shape
    hist = hist.contiguous() if L else hist.new_zeros(B, 1, D)
    if k["uwidths"][0]:
        ht = ht.contiguous() if L else ht.new_zeros(B, 1, k["uwidths"][0])
        qt = qt.contiguous()
    else:
        ht, qt = hist, q
    q, cq, a = q.contiguous(), cq.contiguous(), a.contiguous()
    if idx is None:
        idx_t, sib, sin = lengths, 0, 0
    else:
        idx_t, sib, sin = idx, (0 if idx.dim() == 1 else idx.stride(0)), idx.stride(-1)
    tail = k["tail"]
    tensors = [hist, ht, lengths, q, qt, cq, idx_t, k["wx"], k["uw"][0], k["ub"][0], k["uw"][1], k["ub"][1]]
    tensors += [k["uwo"], k["ubo"], a, k["wp"], *tail.tensors(), tail.bo]
    a1, a2, a3 = k["uwidths"]
    sizes = [D, a1, a2, a3, *tail.h]
    wx_stride = k["wx"].stride(0) if a1 else 0
    strides = [wx_stride, k["wp"].stride(0), hist.stride(0), hist.stride(1), ht.stride(0), ht.stride(1)]
    strides += [q.stride(0), qt.stride(0), cq.stride(0), a.stride(0), sib, sin]
    h1p, h2p, h3p, h4p = tail.pads
    meta = dict(
        KIND=k["kind"],
        NORMALIZE=k["normalize"],
        NU=k["nu"],
        DP=k["dp"],
        A2P=pad_width(a2),
        A3P=pad_width(a3),
        NL=tail.nl,
        H1P=h1p,
        H2P=h2p,
        H3P=h3p,
        H4P=h4p,
        ACT=k["act"],
        HAS_IDX=idx is not None,
        PREC=k["precision"],
    )
    return tensors, sizes, strides, meta


def _prepared(args, kind, normalize, activation, precision):
    """``_prepare`` of the op's arguments ``args`` (up to ``b_out``), with the kernels' constants."""
    k = _prepare(*args, kind, activation, precision)
    k.update(kind=KINDS[kind], normalize=bool(normalize), precision=precision)
    return k


def _target_attention_impl(
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
):
    args = (hist, ht, lengths, q, qt, cq, idx, wx, unit_weights, unit_biases, unit_w_out, unit_b_out)
    k = _prepared((*args, a, wp, weights, biases, w_out, b_out), kind, normalize, activation, precision)
    B = hist.shape[0]
    N = q.shape[0] if idx is None else idx.shape[-1]
    out = torch.empty(B, N, dtype=hist.dtype, device=hist.device)
    if B == 0 or N == 0:
        return out
    tensors, sizes, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, k)

    def grid(m):
        return (B * triton.cdiv(N, m["BLOCK_N"]),)

    _attn_fwd_kernel[grid](*tensors, out, B, N, *sizes, float(scale), *strides, out.stride(0), _n_key(N), **meta)
    return out


def _target_attention_topk_impl(
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
    excl,
    topk,
    splits,
):
    args = (hist, ht, lengths, q, qt, cq, idx, wx, unit_weights, unit_biases, unit_w_out, unit_b_out)
    k = _prepared((*args, a, wp, weights, biases, w_out, b_out), kind, normalize, activation, precision)
    B = hist.shape[0]
    N = q.shape[0] if idx is None else idx.shape[-1]
    topk, r, splits, chunk, keys = topk_mod.launch_plan(B, N, topk, 16 if INTERPRET else 64, splits, excl, hist.device)
    if B and N and topk:
        tensors, sizes, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, k)
        excl_t = excl.contiguous() if excl is not None else lengths
        _attn_topk_kernel[(B * splits,)](
            *tensors,
            excl_t,
            keys,
            B,
            N,
            *sizes,
            topk,
            chunk,
            float(scale),
            *strides,
            excl_t.stride(0) if excl is not None else 0,
            _n_key(N),
            HAS_EXCL=excl is not None,
            R=r,
            SPLITS=splits,
            **meta,
        )
    return topk_mod.decode_keys(keys, topk, hist.dtype)


def _target_attention_backward_impl(
    grad,
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
):
    args = (hist, ht, lengths, q, qt, cq, idx, wx, unit_weights, unit_biases, unit_w_out, unit_b_out)
    k = _prepared((*args, a, wp, weights, biases, w_out, b_out), kind, normalize, activation, precision)
    B, L, D = hist.shape
    M = q.shape[0]
    N = M if idx is None else idx.shape[-1]
    shared = idx is None or idx.dim() == 1
    f32 = dict(dtype=torch.float32, device=hist.device)
    tail = k["tail"]
    h1, (a1, a2, a3), lw = a.shape[1], k["uwidths"], max(L, 1)
    al = k["uwidths"][k["nu"] - 1] if kind == "din" else 1
    # Program groups and their slots (see _common.ownership): user rows [C, B, ...], candidate
    # rows [G, N, ...] (shared candidates) or one row per pair [B, N, ...]; weights per program.
    user_bytes = 4 * B * (lw * (D + a1) + h1)
    cand_bytes = 4 * N * (D + a1 + h1) if shared else 0
    groups_u, groups_n = ownership(programs(hist.device), user_bytes, cand_bytes, B, triton.cdiv(N, 16))
    slots = groups_u * groups_n
    d_hist = torch.zeros(groups_n, B, lw, D, **f32)
    d_ht = torch.zeros(groups_n, B, lw, max(a1, 1), **f32)
    d_a = torch.zeros(groups_n, B, h1, **f32)
    rows = groups_u if shared else B
    d_q = torch.zeros(rows, N, D, **f32)
    d_qt = torch.zeros(rows, N, max(a1, 1), **f32)
    d_cq = torch.zeros(rows, N, h1, **f32)
    d_wx = torch.zeros(slots, max(a1, 1), D, **f32)
    d_uw = [torch.zeros(slots, a2, a1, **f32), torch.zeros(slots, a3, a2, **f32)]
    d_ub = [torch.zeros(slots, a2, **f32), torch.zeros(slots, a3, **f32)]
    d_uwo = torch.zeros(slots, al, **f32)
    d_ubo = torch.zeros(slots, **f32)
    d_wp = torch.zeros(slots, h1, D, **f32)
    hs = tail.h
    d_w = [torch.zeros(slots, hs[i + 1], hs[i], **f32) for i in range(MAX_LAYERS - 1)]
    d_b = [torch.zeros(slots, hs[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    d_wo = torch.zeros(slots, tail.widths[-1], **f32)
    d_bo = torch.zeros(slots, **f32)
    if B and N:
        tensors, sizes, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, k)
        grad = grad.contiguous()
        # Per pair, between the two halves: the pooled history's gradient and the softmax's state.
        d_pooled = torch.empty(B, N, k["dp"], **f32)
        stats = torch.empty(B, N, 3, **f32)
        head = (slots,)
        _attn_bwd_tail_kernel[head](
            *tensors,
            grad,
            d_pooled,
            stats,
            d_cq,
            d_a,
            d_wp,
            d_w[0],
            d_b[0],
            d_w[1],
            d_b[1],
            d_w[2],
            d_b[2],
            d_wo,
            d_bo,
            B,
            N,
            *sizes,
            tail.widths[-1],
            groups_u,
            groups_n,
            float(scale),
            *strides,
            grad.stride(0),
            _n_key(N),
            SHARED=shared,
            **meta,
        )
        hist_c, ht_c, lens_c, q_c, qt_c, _, idx_c = tensors[:7]
        _attn_bwd_hist_kernel[head](
            hist_c,
            ht_c,
            lens_c,
            q_c,
            qt_c,
            idx_c,
            *tensors[7:14],
            d_pooled,
            stats,
            d_hist,
            d_ht,
            d_q,
            d_qt,
            d_wx,
            d_uw[0],
            d_ub[0],
            d_uw[1],
            d_ub[1],
            d_uwo,
            d_ubo,
            B,
            N,
            lw,
            *sizes[:4],
            al,
            groups_u,
            groups_n,
            float(scale),
            strides[0],
            *strides[2:8],
            *strides[10:12],
            _n_key(N),
            SHARED=shared,
            **meta,
        )

    # The slots' sums, in a fixed order; candidate positions into candidate rows.
    def cand_rows(t):
        return _to_rows(t.sum(0) if shared else t, idx, M)

    def back(t, like):
        return t.to(like.dtype)

    out = {
        "hist": back(d_hist.sum(0)[:, :L], hist),
        "q": back(cand_rows(d_q), q),
        "cq": back(cand_rows(d_cq), cq),
        "a": back(d_a.sum(0), a),
        "wp": back(d_wp.sum(0), wp),
        "weights": [back(d_w[i].sum(0), w) for i, w in enumerate(weights)],
        "biases": [back(d_b[i].sum(0), bb) for i, bb in enumerate(biases)],
        "w_out": back(d_wo.sum(0), w_out),
        "b_out": back(d_bo.sum(0, keepdim=True).reshape(b_out.shape), b_out),
    }
    if kind == "din":
        out.update(
            ht=back(d_ht.sum(0)[:, :L], ht),
            qt=back(cand_rows(d_qt), qt),
            wx=back(d_wx.sum(0), wx),
            unit_weights=[back(d_uw[i].sum(0), w) for i, w in enumerate(unit_weights)],
            unit_biases=[back(d_ub[i].sum(0), bb) for i, bb in enumerate(unit_biases)],
            unit_w_out=back(d_uwo.sum(0), unit_w_out),
            unit_b_out=back(d_ubo.sum(0, keepdim=True).reshape(unit_b_out.shape), unit_b_out),
        )
    return out


_GRAD_ORDER = ("hist", "ht", "q", "qt", "cq", "wx", "unit_w_out", "unit_b_out", "a", "wp", "w_out", "b_out")


@torch.library.custom_op("rankfast::target_attention_backward", mutates_args=())
def _target_attention_backward_op(
    grad: torch.Tensor,
    hist: torch.Tensor,
    ht: torch.Tensor | None,
    lengths: torch.Tensor,
    q: torch.Tensor,
    qt: torch.Tensor | None,
    cq: torch.Tensor,
    idx: torch.Tensor | None,
    wx: torch.Tensor | None,
    unit_weights: list[torch.Tensor],
    unit_biases: list[torch.Tensor],
    unit_w_out: torch.Tensor | None,
    unit_b_out: torch.Tensor | None,
    a: torch.Tensor,
    wp: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    kind: str,
    normalize: bool,
    scale: float,
    activation: str,
    precision: str,
) -> list[torch.Tensor]:
    """Gradients in the order of ``_GRAD_ORDER``, then unit weights, unit biases, weights, biases
    (absent optional inputs get an empty tensor)."""
    out = _target_attention_backward_impl(
        grad,
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        weights,
        biases,
        w_out,
        b_out,
        kind,
        normalize,
        scale,
        activation,
        precision,
    )
    flat = [out[name] if name in out else hist.new_empty(0) for name in _GRAD_ORDER]
    return flat + out.get("unit_weights", []) + out.get("unit_biases", []) + out["weights"] + out["biases"]


@_target_attention_backward_op.register_fake
def _(
    grad,
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
):
    given = dict(
        hist=hist,
        ht=ht,
        q=q,
        qt=qt,
        cq=cq,
        wx=wx,
        unit_w_out=unit_w_out,
        unit_b_out=unit_b_out,
        a=a,
        wp=wp,
        w_out=w_out,
        b_out=b_out,
    )
    flat = [hist.new_empty(0) if given[n] is None else torch.empty_like(given[n]) for n in _GRAD_ORDER]
    if kind != "din":
        unit_weights, unit_biases = [], []
    return flat + [torch.empty_like(t) for t in (*unit_weights, *unit_biases, *weights, *biases)]


def _attn_setup_context(ctx, inputs, output):
    (
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        weights,
        biases,
        w_out,
        b_out,
        kind,
        normalize,
        scale,
        activation,
        precision,
    ) = inputs
    ctx.save_for_backward(
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        w_out,
        b_out,
        *unit_weights,
        *unit_biases,
        *weights,
        *biases,
    )
    ctx.counts = (len(unit_weights), len(weights))
    ctx.attrs = (kind, normalize, scale, activation, precision)


def _attn_backward(ctx, grad):
    saved = ctx.saved_tensors
    hist, ht, lengths, q, qt, cq, idx, wx, unit_w_out, unit_b_out, a, wp, w_out, b_out = saved[:14]
    nu, nw = ctx.counts
    rest = saved[14:]
    unit_weights, unit_biases = list(rest[:nu]), list(rest[nu : 2 * nu])
    weights, biases = list(rest[2 * nu : 2 * nu + nw]), list(rest[2 * nu + nw :])
    kind = ctx.attrs[0]
    grads = torch.ops.rankfast.target_attention_backward(
        grad,
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        weights,
        biases,
        w_out,
        b_out,
        *ctx.attrs,
    )
    g = dict(zip(_GRAD_ORDER, grads[: len(_GRAD_ORDER)], strict=True))
    tail = grads[len(_GRAD_ORDER) :]
    nu_eff = nu if kind == "din" else 0
    g_uw, g_ub = tail[:nu_eff], tail[nu_eff : 2 * nu_eff]
    g_w, g_b = tail[2 * nu_eff : 2 * nu_eff + nw], tail[2 * nu_eff + nw :]
    din = kind == "din"

    def opt(name, given):
        return g[name] if given is not None and din else None

    return (
        g["hist"],
        opt("ht", ht),
        None,
        g["q"],
        opt("qt", qt),
        g["cq"],
        None,
        opt("wx", wx),
        list(g_uw) if din else [None] * nu,
        list(g_ub) if din else [None] * nu,
        opt("unit_w_out", unit_w_out),
        opt("unit_b_out", unit_b_out),
        g["a"],
        g["wp"],
        list(g_w),
        list(g_b),
        g["w_out"],
        g["b_out"],
        None,
        None,
        None,
        None,
        None,
    )


# --- PyTorch operator ------------------------------------------------------------------


@torch.library.custom_op("rankfast::target_attention_score", mutates_args=())
def _target_attention_op(
    hist: torch.Tensor,
    ht: torch.Tensor | None,
    lengths: torch.Tensor,
    q: torch.Tensor,
    qt: torch.Tensor | None,
    cq: torch.Tensor,
    idx: torch.Tensor | None,
    wx: torch.Tensor | None,
    unit_weights: list[torch.Tensor],
    unit_biases: list[torch.Tensor],
    unit_w_out: torch.Tensor | None,
    unit_b_out: torch.Tensor | None,
    a: torch.Tensor,
    wp: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    kind: str,
    normalize: bool,
    scale: float,
    activation: str,
    precision: str,
) -> torch.Tensor:
    return _target_attention_impl(
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        weights,
        biases,
        w_out,
        b_out,
        kind,
        normalize,
        scale,
        activation,
        precision,
    )


@_target_attention_op.register_fake
def _(
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
):
    n = q.shape[0] if idx is None else idx.shape[-1]
    return hist.new_empty(hist.shape[0], n)


_target_attention_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("rankfast::target_attention_topk", mutates_args=())
def _target_attention_topk_op(
    hist: torch.Tensor,
    ht: torch.Tensor | None,
    lengths: torch.Tensor,
    q: torch.Tensor,
    qt: torch.Tensor | None,
    cq: torch.Tensor,
    idx: torch.Tensor | None,
    wx: torch.Tensor | None,
    unit_weights: list[torch.Tensor],
    unit_biases: list[torch.Tensor],
    unit_w_out: torch.Tensor | None,
    unit_b_out: torch.Tensor | None,
    a: torch.Tensor,
    wp: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    kind: str,
    normalize: bool,
    scale: float,
    activation: str,
    precision: str,
    excl: torch.Tensor | None,
    k: int,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _target_attention_topk_impl(
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        a,
        wp,
        weights,
        biases,
        w_out,
        b_out,
        kind,
        normalize,
        scale,
        activation,
        precision,
        excl,
        k,
        splits,
    )


@_target_attention_topk_op.register_fake
def _(
    hist,
    ht,
    lengths,
    q,
    qt,
    cq,
    idx,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    a,
    wp,
    weights,
    biases,
    w_out,
    b_out,
    kind,
    normalize,
    scale,
    activation,
    precision,
    excl,
    k,
    splits,
):
    return hist.new_empty(hist.shape[0], k, dtype=torch.int64), hist.new_empty(hist.shape[0], k)


def _op_args(
    hist,
    lengths,
    q,
    cq,
    a,
    wp,
    idx,
    kind,
    ht,
    qt,
    wx,
    unit_weights,
    unit_biases,
    unit_w_out,
    unit_b_out,
    normalize,
    scale,
    weights,
    biases,
    w_out,
    b_out,
    activation,
    precision,
):
    return (
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx,
        wx,
        list(unit_weights),
        list(unit_biases),
        unit_w_out,
        unit_b_out,
        a,
        wp,
        list(weights),
        list(biases),
        w_out,
        b_out,
        kind,
        bool(normalize),
        float(scale),
        activation,
        precision,
    )


def target_attention_topk(
    hist,
    lengths,
    q,
    cq,
    a,
    wp,
    *,
    k,
    exclude_mask=None,
    splits=0,
    idx=None,
    kind="din",
    ht=None,
    qt=None,
    wx=None,
    unit_weights=(),
    unit_biases=(),
    unit_w_out=None,
    unit_b_out=None,
    normalize=True,
    scale=1.0,
    weights=(),
    biases=(),
    w_out,
    b_out,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Fused score + top-K: each user's best ``k`` candidate ``(positions, values)`` ``[B, k]``
    (rules of :func:`rankfast.topk`); arguments as :func:`target_attention_score`, plus
    ``exclude_mask`` and ``splits`` as in :func:`rankfast.kernels.mlp_score.mlp_score_topk`."""
    if check_ids:
        _check_values(hist, lengths, q, idx)
    args = _op_args(
        hist,
        lengths,
        q,
        cq,
        a,
        wp,
        idx,
        kind,
        ht,
        qt,
        wx,
        unit_weights,
        unit_biases,
        unit_w_out,
        unit_b_out,
        normalize,
        scale,
        weights,
        biases,
        w_out,
        b_out,
        activation,
        default_precision(precision),
    )
    topk_mod.check_k(k)
    return torch.ops.rankfast.target_attention_topk(*args, exclude_mask, int(k), int(splits))


def target_attention_score(
    hist,
    lengths,
    q,
    cq,
    a,
    wp,
    *,
    idx=None,
    kind="din",
    ht=None,
    qt=None,
    wx=None,
    unit_weights=(),
    unit_biases=(),
    unit_w_out=None,
    unit_b_out=None,
    normalize=True,
    scale=1.0,
    weights=(),
    biases=(),
    w_out,
    b_out,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Fused target-attention scores ``[B, N]``; differentiable with respect to every tensor but
    ``lengths`` and ``idx``.

    Args:
        hist: ``[B, L, D]`` history item vectors; ``lengths [B]`` valid counts.
        q: ``[M, D]`` candidate vectors; ``idx`` selects candidates as in
            :func:`rankfast.kernels.mlp_score.mlp_score` (``None``: all M).
        cq: ``[M, H1]`` the candidates' term of the output MLP's first layer;
            ``a``: ``[B, H1]`` the users' term, its bias included; ``wp``:
            ``[H1, D]`` the pooled history's block of that layer's weight.
        kind: ``"din"`` (``ht [B, L, A1]`` history term with the unit's first
            bias, ``qt [M, A1]`` candidate term, ``wx [A1, D]`` the h*q block;
            ``unit_weights/biases`` the unit's further layers,
            ``unit_w_out``/``unit_b_out`` its output layer) or ``"dot"``
            (logit ``<h, q> * scale``).
        normalize: softmax over the valid history (True) or raw masked logits.
        weights, biases, w_out, b_out, activation, precision: the output MLP
            after its first layer, as in ``mlp_score``.
        check_ids: check that ``lengths`` lie in ``[0, L]`` and ``idx`` in ``[0, M)`` (one
            device sync); a caller that has checked them passes False, as the fused backend does.
    """
    if check_ids:
        _check_values(hist, lengths, q, idx)
    return torch.ops.rankfast.target_attention_score(
        *_op_args(
            hist,
            lengths,
            q,
            cq,
            a,
            wp,
            idx,
            kind,
            ht,
            qt,
            wx,
            unit_weights,
            unit_biases,
            unit_w_out,
            unit_b_out,
            normalize,
            scale,
            weights,
            biases,
            w_out,
            b_out,
            activation,
            default_precision(precision),
        )
    )


def _check_values(hist, lengths, q, idx):
    """The value checks the kernels rely on (a length past L or an id out of range would read out
    of bounds): one device sync; skipped while tracing."""
    if torch.compiler.is_compiling() or not lengths.numel():
        return
    length = hist.shape[1]
    flags = [(lengths < 0).any(), (lengths > length).any()]
    if idx is not None:
        check_index_layout(idx, hist.shape[0], idx.device)
        flags.append(((idx < 0) | (idx >= q.shape[0])).any())
    if bool(torch.stack(flags).any()):  # the one sync; the messages below only run when a check failed
        if bool(flags[0] | flags[1]):
            raise ValueError(
                f"lengths: each must lie in [0, L={length}], got [{int(lengths.min())}, {int(lengths.max())}]"
            )
        check_index("idx", idx, q.shape[0])
