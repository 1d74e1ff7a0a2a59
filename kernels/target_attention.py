"""Fused target-attention scoring (AttentionModel, DIN and "dot" kinds): forward.

Per user row and tile of ``BLOCK_N`` candidates, one program:

1. walks the user's valid history (``lengths[b]`` items) in blocks of
   ``BLOCK_L``. DIN's activation unit over ``[h, q, h-q, h*q]`` splits as
   ``(Wh + Wd) h + (Wq - Wd) q + Wx (h*q)``: the history term ``HT [B, L, A1]``
   (unit bias included) and candidate term ``QT [M, A1]`` come precomputed,
   only ``(h*q) @ Wx^T`` runs per (pair, history item), on ``tl.dot`` over
   the flattened ``[BLOCK_N * BLOCK_L, D]`` tile, followed by the unit's other
   layers. The "dot" kind uses ``<h, q> * scale``.
2. pools the history with a masked softmax computed online (running max,
   denominator and weighted sum, as in flash attention), or with the raw
   masked logits as weights (DIN's ``normalize=False``). An empty history
   pools to zero.
3. runs the output MLP on ``[E_u; pooled; E_q]`` in the same pass, its first
   layer split as ``A_u + CQ_q + pooled @ Wp^T`` (see ``kernels/mlp_score.py``).

Nothing per pair or per (pair, history item) reaches global memory.

Backward (``rankfast::target_attention_backward``, registered as the op's
autograd): per user x candidate tile it recomputes the forward (keeping the
softmax's running max and denominator), backpropagates the output MLP to the
gradient of the pooled history, then walks the history again: softmax
backward ``ds = p * (dpooled . h - dpooled . pooled)`` (or the raw-weight
version), the DIN unit's backward (or the dot's), and atomically adds the
gradients of the history rows ``[B, L, D]``, the history/candidate terms,
candidates and every weight. Nothing per (pair, history item) is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfast.kernels import topk as topk_mod
from rankfast.kernels._common import (
    INTERPRET,
    MAX_WIDTH,
    act_fn,
    act_grad,
    cast,
    check_activation,
    check_device,
    check_dtype,
    check_index,
    check_precision,
    check_split_term,
    configs,
    default_precision,
    dot,
    item_rows,
    pad_width,
    padded_t,
    padded_vec,
)
from rankfast.kernels.mlp_score import MAX_LAYERS, _mlp_pairs, _n_key, _tail_bwd, backward_programs
from rankfast.kernels.topk import excluded, merge, store_keys, tile_keys

KINDS = {"din": 0, "dot": 1}
MAX_UNIT_LAYERS = 3


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_L": 16, "BJ": 16}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_N": bn, "BLOCK_L": bl, "BJ": bj}, num_warps=w, num_stages=2)
        for bn, bl, bj, w in ((16, 16, 32, 4), (32, 16, 64, 8), (16, 32, 64, 8), (32, 32, 64, 8))
    ]
    return configs(out, out[0])


@triton.jit
def _unit_logits(
    q32,
    h,
    HT,
    ht_row,
    lmask,
    QT_tile,
    WX,
    UW2,
    UB2,
    UW3,
    UB3,
    UWO,
    UBO,
    A1,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A1P: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """DIN activation unit for every (candidate, history item) of the block: ``[BLOCK_N, BLOCK_L]`` fp32."""
    dd = tl.arange(0, DP)
    ca = tl.arange(0, A1P)
    wx = tl.load(WX + dd[:, None] * A1P + ca[None, :])
    x = tl.reshape(q32[:, None, :] * h[None, :, :], (BLOCK_N * BLOCK_L, DP))
    ht = tl.load(ht_row[:, None] + ca[None, :], mask=lmask[:, None] & (ca[None, :] < A1), other=0.0).to(tl.float32)
    base = tl.reshape(QT_tile[:, None, :] + ht[None, :, :], (BLOCK_N * BLOCK_L, A1P))
    a = act_fn(dot(cast(x, wx.dtype), wx, base, PREC=PREC), ACT)
    if NU >= 2:
        c2 = tl.arange(0, A2P)
        w2 = tl.load(UW2 + ca[:, None] * A2P + c2[None, :])
        a = act_fn(dot(cast(a, w2.dtype), w2, PREC=PREC) + tl.load(UB2 + c2)[None, :], ACT)
        if NU == 3:
            c3 = tl.arange(0, A3P)
            w3 = tl.load(UW3 + c2[:, None] * A3P + c3[None, :])
            a = act_fn(dot(cast(a, w3.dtype), w3, PREC=PREC) + tl.load(UB3 + c3)[None, :], ACT)
            wo = tl.load(UWO + c3)
        else:
            wo = tl.load(UWO + c2)
    else:
        wo = tl.load(UWO + ca)
    logit = tl.sum(a * wo[None, :], axis=1)
    return tl.reshape(logit, (BLOCK_N, BLOCK_L)) + tl.load(UBO).to(tl.float32)


@triton.jit
def _pool(
    b,
    n_item,
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
    A1P: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """The pooled history of user ``b`` for each candidate of the tile: ``[BLOCK_N, DP]`` fp32.

    The forward weights the history with probabilities rounded to the input dtype (a tensor-core
    dot). ``EXACT`` (the backward) weights it in fp32 instead, so that ``d pooled . pooled``
    equals ``sum_l p_l (d pooled . h_l)`` for the same ``p`` the softmax gradient uses: the
    gradients of the logits then sum to zero, as they must. With bf16 weights they would not,
    and that offset, common to every history item, swamps the attention unit's small gradients.
    The cost is one fp32 ``[BLOCK_N, BLOCK_L] x [BLOCK_L, D]`` product per block."""
    dd = tl.arange(0, DP)
    dmask = dd < D
    q = tl.load(Q + n_item[:, None] * stride_q + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    q32 = q.to(tl.float32)
    if KIND == 0:
        ca = tl.arange(0, A1P)
        qt = tl.load(
            QT + n_item[:, None] * stride_qt + ca[None, :], mask=nmask[:, None] & (ca[None, :] < A1), other=0.0
        ).to(tl.float32)
    length = tl.load(LENS + b).to(tl.int32)
    acc = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_N], dtype=tl.float32)
    b64 = b.to(tl.int64)
    for l0 in range(0, length, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        lmask = ll < length
        h_raw = tl.load(
            HIST + b64 * stride_hb + ll[:, None].to(tl.int64) * stride_hl + dd[None, :],
            mask=lmask[:, None] & dmask[None, :],
            other=0.0,
        )
        h = h_raw.to(tl.float32)
        if KIND == 0:
            ht_row = HT + b64 * stride_tb + ll.to(tl.int64) * stride_tl
            logit = _unit_logits(
                q32,
                h,
                HT,
                ht_row,
                lmask,
                qt,
                WX,
                UW2,
                UB2,
                UW3,
                UB3,
                UWO,
                UBO,
                A1,
                NU,
                DP,
                A1P,
                A2P,
                A3P,
                BLOCK_N,
                BLOCK_L,
                ACT,
                PREC,
            )
        else:
            logit = dot(q, tl.trans(h_raw), PREC=PREC) * scale
        if NORMALIZE:
            logit = tl.where(lmask[None, :], logit, float("-inf"))
            m_new = tl.maximum(m, tl.max(logit, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(logit - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            if EXACT:
                acc = dot(p, h, acc * alpha[:, None], PREC="ieee")
            else:
                acc = dot(cast(p, h_raw.dtype), h_raw, acc * alpha[:, None], PREC=PREC)
            m = m_new
        else:
            w = tl.where(lmask[None, :], logit, 0.0)
            acc = dot(cast(w, h_raw.dtype), h_raw, acc, PREC=PREC)
    if NORMALIZE:
        acc = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    return acc, m, denom


@triton.autotune(
    configs=_configs(),
    key=[
        "N_KEY",
        "KIND",
        "NORMALIZE",
        "NU",
        "DP",
        "A1P",
        "A2P",
        "A3P",
        "NL",
        "H1P",
        "H2P",
        "H3P",
        "H4P",
        "ACT",
        "HAS_IDX",
    ],
)
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
    H1,
    scale,
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
    A1P: tl.constexpr,
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
    BLOCK_L: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    b = pid // num_n
    n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    b64 = b.to(tl.int64)
    item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
    pooled, _, _ = _pool(
        b,
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
        A1P,
        A2P,
        A3P,
        BLOCK_N,
        BLOCK_L,
        ACT,
        PREC,
    )
    a_row = A + b64 * stride_a + tl.zeros([BLOCK_N], dtype=tl.int64)
    score = _mlp_pairs(
        a_row,
        CQ + item * stride_cq,
        nmask,
        H1,
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
        H1P,
        H2P,
        H3P,
        H4P,
        BJ1,
        BJ3,
        BLOCK_N,
        ACT,
        PREC,
    )
    score += tl.load(BO).to(tl.float32)
    tl.store(OUT + b64 * stride_ob + n, cast(score, OUT.dtype.element_ty), mask=nmask)


def _topk_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_L": 16, "BJ": 16}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_L": 16, "BJ": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_L": 32, "BJ": 64}, num_warps=8, num_stages=2),
    ]
    return configs(out, out[0])


@triton.autotune(
    configs=_topk_configs(),
    key=[
        "N_KEY",
        "KIND",
        "NORMALIZE",
        "NU",
        "DP",
        "A1P",
        "A2P",
        "A3P",
        "NL",
        "H1P",
        "H2P",
        "H3P",
        "H4P",
        "ACT",
        "HAS_IDX",
        "HAS_EXCL",
        "R",
    ],
)
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
    H1,
    K,
    CHUNK,
    scale,
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
    A1P: tl.constexpr,
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
    BLOCK_L: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """Score + top-K: program (user b, split s) scores candidates [s * CHUNK, (s + 1) * CHUNK) in tiles of R."""
    pid = tl.program_id(0)
    b = pid // SPLITS
    split = pid % SPLITS
    b64 = b.to(tl.int64)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    bo = tl.load(BO).to(tl.float32)
    running = tl.full([R], -(2**63), dtype=tl.int64)
    a_row = A + b64 * stride_a + tl.zeros([R], dtype=tl.int64)
    for n0 in range(start, end, R):
        n = n0 + tl.arange(0, R)
        nmask = n < end
        item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
        pooled, _, _ = _pool(
            b,
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
            A1P,
            A2P,
            A3P,
            R,
            BLOCK_L,
            ACT,
            PREC,
        )
        score = _mlp_pairs(
            a_row,
            CQ + item * stride_cq,
            nmask,
            H1,
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
            H1P,
            H2P,
            H3P,
            H4P,
            BJ1,
            BJ3,
            R,
            ACT,
            PREC,
        )
        score = cast(score + bo, HIST.dtype.element_ty).to(tl.float32)
        eligible = nmask & (~excluded(EXCL, b64, stride_e, n, nmask, HAS_EXCL))
        running = merge(running, tile_keys(score, n, eligible))
    store_keys(running, OUT_KEYS, pid, K, R)


@triton.jit
def _unit_bwd(
    q32,
    h,
    ht_row,
    lmask,
    qt,
    ds,
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
    A1,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A1P: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of the DIN unit for one history block given ``ds = d logit [BLOCK_N, BLOCK_L]``:
    adds the unit's weight gradients atomically; returns ``(dq [BLOCK_N, DP], dh [BLOCK_L, DP],
    dqt [BLOCK_N, A1P], dht [BLOCK_L, A1P])`` (the h*q term's and the split terms' gradients)."""
    dd = tl.arange(0, DP)
    ca = tl.arange(0, A1P)
    wx = tl.load(WX + dd[:, None] * A1P + ca[None, :])
    x = cast(tl.reshape(q32[:, None, :] * h[None, :, :], (BLOCK_N * BLOCK_L, DP)), wx.dtype)
    ht = tl.load(ht_row[:, None] + ca[None, :], mask=lmask[:, None] & (ca[None, :] < A1), other=0.0).to(tl.float32)
    base = tl.reshape(qt[:, None, :] + ht[None, :, :], (BLOCK_N * BLOCK_L, A1P))
    z1 = dot(x, wx, base, PREC=PREC)
    a1 = act_fn(z1, ACT)
    dsf = tl.reshape(ds, (BLOCK_N * BLOCK_L,))
    tl.atomic_add(DUBO, tl.sum(dsf, axis=0))
    if NU >= 2:
        c2 = tl.arange(0, A2P)
        w2 = tl.load(UW2 + ca[:, None] * A2P + c2[None, :])
        a1c = cast(a1, w2.dtype)
        z2 = dot(a1c, w2, PREC=PREC) + tl.load(UB2 + c2)[None, :]
        a2 = act_fn(z2, ACT)
        if NU == 3:
            c3 = tl.arange(0, A3P)
            w3 = tl.load(UW3 + c2[:, None] * A3P + c3[None, :])
            a2c = cast(a2, w3.dtype)
            z3 = dot(a2c, w3, PREC=PREC) + tl.load(UB3 + c3)[None, :]
            a3 = act_fn(z3, ACT)
            tl.atomic_add(DUWO + c3, tl.sum(a3 * dsf[:, None], axis=0))
            dz3 = dsf[:, None] * tl.load(UWO + c3)[None, :] * act_grad(z3, ACT)
            tl.atomic_add(DUB3 + c3, tl.sum(dz3, axis=0))
            dz3c = cast(dz3, w3.dtype)
            tl.atomic_add(DUW3 + c2[:, None] * A3P + c3[None, :], dot(tl.trans(a2c), dz3c, PREC=PREC))
            da2 = dot(dz3c, tl.trans(w3), PREC=PREC)
        else:
            tl.atomic_add(DUWO + c2, tl.sum(a2 * dsf[:, None], axis=0))
            da2 = dsf[:, None] * tl.load(UWO + c2)[None, :]
        dz2 = da2 * act_grad(z2, ACT)
        tl.atomic_add(DUB2 + c2, tl.sum(dz2, axis=0))
        dz2c = cast(dz2, w2.dtype)
        tl.atomic_add(DUW2 + ca[:, None] * A2P + c2[None, :], dot(tl.trans(a1c), dz2c, PREC=PREC))
        da1 = dot(dz2c, tl.trans(w2), PREC=PREC)
    else:
        tl.atomic_add(DUWO + ca, tl.sum(a1 * dsf[:, None], axis=0))
        da1 = dsf[:, None] * tl.load(UWO + ca)[None, :]
    dz1 = da1 * act_grad(z1, ACT)
    dz1c = cast(dz1, wx.dtype)
    tl.atomic_add(DWX + dd[:, None] * A1P + ca[None, :], dot(tl.trans(x), dz1c, PREC=PREC))
    dx = tl.reshape(dot(dz1c, tl.trans(wx), PREC=PREC), (BLOCK_N, BLOCK_L, DP))
    dq = tl.sum(dx * h[None, :, :], axis=1)
    dh = tl.sum(dx * q32[:, None, :], axis=0)
    dz13 = tl.reshape(dz1, (BLOCK_N, BLOCK_L, A1P))
    return dq, dh, tl.sum(dz13, axis=1), tl.sum(dz13, axis=0)


@triton.autotune(
    configs=_configs(),
    key=[
        "N_KEY",
        "KIND",
        "NORMALIZE",
        "NU",
        "DP",
        "A1P",
        "A2P",
        "A3P",
        "NL",
        "H1P",
        "H2P",
        "H3P",
        "H4P",
        "ACT",
        "HAS_IDX",
        "SHARED",
    ],
    reset_to_zero=[
        "DHIST",
        "DHT",
        "DQ",
        "DQT",
        "DCQ",
        "DWX",
        "DUW2",
        "DUB2",
        "DUW3",
        "DUB3",
        "DUWO",
        "DUBO",
        "DA",
        "DWP",
        "DW2",
        "DB2",
        "DW3",
        "DB3",
        "DW4",
        "DB4",
        "DWO",
        "DBO",
    ],
)
@triton.heuristics({"BJ1": lambda a: min(a["BJ"], a["H1P"]), "BJ3": lambda a: min(a["BJ"], a["H3P"])})
@triton.jit
def _attn_bwd_kernel(
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
    DHIST,
    DHT,
    DQ,
    DQT,
    DCQ,
    DWX,
    DUW2,
    DUB2,
    DUW3,
    DUB3,
    DUWO,
    DUBO,
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
    H1,
    scale,
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
    A1P: tl.constexpr,
    A2P: tl.constexpr,
    A3P: tl.constexpr,
    AULP: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    HLP: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SHARED: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """Persistent over (user b, candidate tile) work items: recomputes the forward, backpropagates
    the output MLP (gradient of the pooled history), then walks the history again: softmax (or
    raw-weight) backward, the DIN unit's or the dot's backward. History, candidate and user-term
    gradients go atomically to their rows; weight and bias gradients to the program's own slot
    (``[programs, ...]`` buffers, summed on the host)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    slot = pid.to(tl.int64)
    DWX += slot * (DP * A1P)
    DUW2 += slot * (A1P * A2P)
    DUB2 += slot * A2P
    DUW3 += slot * (A2P * A3P)
    DUB3 += slot * A3P
    DUWO += slot * AULP
    DUBO += slot
    DWP += slot * (DP * H1P)
    DW2 += slot * (H1P * H2P)
    DB2 += slot * H2P
    DW3 += slot * (H2P * H3P)
    DB3 += slot * H3P
    DW4 += slot * (H3P * H4P)
    DB4 += slot * H4P
    DWO += slot * HLP
    DBO += slot
    num_n = tl.cdiv(N, BLOCK_N)
    for work in range(pid, B * num_n, num_programs):
        _attn_bwd_item(
            work // num_n,
            work % num_n,
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
            GOUT,
            DHIST,
            DHT,
            DQ,
            DQT,
            DCQ,
            DWX,
            DUW2,
            DUB2,
            DUW3,
            DUB3,
            DUWO,
            DUBO,
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
            H1,
            scale,
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
            KIND,
            NORMALIZE,
            NU,
            DP,
            A1P,
            A2P,
            A3P,
            NL,
            H1P,
            H2P,
            H3P,
            H4P,
            ACT,
            HAS_IDX,
            SHARED,
            PREC,
            BLOCK_N,
            BLOCK_L,
            BJ1,
            BJ3,
        )


@triton.jit
def _attn_bwd_item(
    b,
    tile,
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
    GOUT,
    DHIST,
    DHT,
    DQ,
    DQT,
    DCQ,
    DWX,
    DUW2,
    DUB2,
    DUW3,
    DUB3,
    DUWO,
    DUBO,
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
    H1,
    scale,
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
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    NU: tl.constexpr,
    DP: tl.constexpr,
    A1P: tl.constexpr,
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
    BLOCK_L: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """The backward of user ``b`` x candidate tile ``tile`` (see ``_attn_bwd_kernel``)."""
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    b64 = b.to(tl.int64)
    item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
    pooled, m, denom = _pool(
        b,
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
        A1P,
        A2P,
        A3P,
        BLOCK_N,
        BLOCK_L,
        ACT,
        PREC,
        EXACT=True,
    )
    go = tl.load(GOUT + b64 * stride_go + n, mask=nmask, other=0.0).to(tl.float32)
    tl.atomic_add(DBO, tl.sum(go, axis=0))
    a_row = A + b64 * stride_a + tl.zeros([BLOCK_N], dtype=tl.int64)
    dpooled = _tail_bwd(
        a_row,
        CQ + item * stride_cq,
        nmask,
        item,
        go,
        H1,
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
        tile,
        B,
        N,
        IDX,
        stride_ib,
        stride_in,
        NL,
        H1P,
        H2P,
        H3P,
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

    dd = tl.arange(0, DP)
    dmask = dd < D
    q = tl.load(Q + item[:, None] * stride_q + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
    q32 = q.to(tl.float32)
    ca = tl.arange(0, A1P)
    if KIND == 0:
        qt = tl.load(
            QT + item[:, None] * stride_qt + ca[None, :], mask=nmask[:, None] & (ca[None, :] < A1), other=0.0
        ).to(tl.float32)
    dq = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    dqt = tl.zeros([BLOCK_N, A1P], dtype=tl.float32)
    if NORMALIZE:
        delta = tl.sum(dpooled * pooled, axis=1)
        inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)
    length = tl.load(LENS + b).to(tl.int32)
    for l0 in range(0, length, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        lmask = ll < length
        h_raw = tl.load(
            HIST + b64 * stride_hb + ll[:, None].to(tl.int64) * stride_hl + dd[None, :],
            mask=lmask[:, None] & dmask[None, :],
            other=0.0,
        )
        h = h_raw.to(tl.float32)
        ht_row = HT + b64 * stride_tb + ll.to(tl.int64) * stride_tl
        if KIND == 0:
            logit = _unit_logits(
                q32,
                h,
                HT,
                ht_row,
                lmask,
                qt,
                WX,
                UW2,
                UB2,
                UW3,
                UB3,
                UWO,
                UBO,
                A1,
                NU,
                DP,
                A1P,
                A2P,
                A3P,
                BLOCK_N,
                BLOCK_L,
                ACT,
                PREC,
            )
        else:
            logit = dot(q, tl.trans(h_raw), PREC=PREC) * scale
        dp = dot(dpooled, tl.trans(h), PREC=PREC)  # d pooled . h_l, [BLOCK_N, BLOCK_L]
        valid = lmask[None, :] & nmask[:, None]
        if NORMALIZE:
            p = tl.where(valid, tl.exp(logit - m[:, None]) * inv[:, None], 0.0)
            ds = p * (dp - delta[:, None])
            dh = dot(tl.trans(p), dpooled, PREC=PREC)
        else:
            w = tl.where(valid, logit, 0.0)
            ds = tl.where(valid, dp, 0.0)
            dh = dot(tl.trans(w), dpooled, PREC=PREC)
        if KIND == 0:
            dq_b, dh_b, dqt_b, dht_b = _unit_bwd(
                q32,
                h,
                ht_row,
                lmask,
                qt,
                ds,
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
                A1,
                NU,
                DP,
                A1P,
                A2P,
                A3P,
                BLOCK_N,
                BLOCK_L,
                ACT,
                PREC,
            )
            dq += dq_b
            dh += dh_b
            dqt += dqt_b
            tl.atomic_add(
                DHT + b64 * stride_tb + ll[:, None].to(tl.int64) * stride_tl + ca[None, :],
                dht_b,
                mask=lmask[:, None] & (ca[None, :] < A1),
            )
        else:
            dq += dot(ds, h, PREC=PREC) * scale
            dh += dot(tl.trans(ds), q32, PREC=PREC) * scale
        tl.atomic_add(
            DHIST + b64 * stride_hb + ll[:, None].to(tl.int64) * stride_hl + dd[None, :],
            dh,
            mask=lmask[:, None] & dmask[None, :],
        )
    tl.atomic_add(DQ + item[:, None] * stride_q + dd[None, :], dq, mask=nmask[:, None] & dmask[None, :])
    if KIND == 0:
        tl.atomic_add(DQT + item[:, None] * stride_qt + ca[None, :], dqt, mask=nmask[:, None] & (ca[None, :] < A1))


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
    """Checks the op's inputs; returns the launch constants and padded weights."""
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
    if not torch.compiler.is_compiling() and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > L):
        raise ValueError(f"lengths: each must lie in [0, L={L}], got [{int(lengths.min())}, {int(lengths.max())}]")
    if q.dim() != 2 or q.shape[1] != D:
        raise ValueError(f"q: expected [M, D={D}], got {tuple(q.shape)}")
    if a.dim() != 2 or cq.dim() != 2 or a.shape[0] != B or cq.shape[0] != q.shape[0] or a.shape[1] != cq.shape[1]:
        raise ValueError(
            f"a, cq: expected [B={B}, H1] and [M={q.shape[0]}, H1], got {tuple(a.shape)}, {tuple(cq.shape)}"
        )
    if wp.shape != (a.shape[1], D):
        raise ValueError(f"wp: expected [H1={a.shape[1]}, D={D}], got {tuple(wp.shape)}")
    check_dtype("q", q, dtype)
    for name, t in (("cq", cq), ("a", a)):
        check_split_term(name, t, dtype)
    for name, t in (("q", q), ("cq", cq), ("a", a)):
        check_device(name, t, device)
    if idx is not None:
        if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[0] != B):
            raise ValueError(f"idx: expected [N] or [B={B}, N], got {tuple(idx.shape)}")
        check_device("idx", idx, device)
        check_index("idx", idx, q.shape[0])
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

    k = {}
    k["dp"] = pad_width(D)
    pads = [pad_width(w) for w in widths] + [16] * (MAX_LAYERS - len(widths))
    k["pads"] = pads
    k["nl"] = len(widths)
    dummy_w = hist.new_zeros(16, dtype=dtype)
    dummy = hist.new_zeros(16, dtype=torch.float32)
    tail_w = [padded_t(w, pads[i], pads[i + 1], dtype) for i, w in enumerate(weights)]
    tail_b = [padded_vec(bb, pads[i + 1], like=hist) for i, bb in enumerate(biases)]
    k["w"] = tail_w + [dummy_w] * (MAX_LAYERS - 1 - len(tail_w))
    k["b"] = tail_b + [dummy] * (MAX_LAYERS - 1 - len(tail_b))
    k["wo"] = padded_vec(w_out, pads[len(widths) - 1], like=hist)
    k["wp"] = padded_t(wp, k["dp"], pads[0], dtype)
    if kind == "din":
        if wx is None or qt is None or ht is None or unit_w_out is None or unit_b_out is None:
            raise ValueError("wx, ht, qt, unit_w_out, unit_b_out: required for kind='din'")
        a1 = wx.shape[0]
        if wx.shape != (a1, D) or ht.shape != (B, L, a1) or qt.shape != (q.shape[0], a1):
            raise ValueError(
                f"wx, ht, qt: expected [A1, D={D}], [B, L, A1], [M, A1], got "
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
        upads = [pad_width(w) for w in uwidths] + [16] * (MAX_UNIT_LAYERS - len(uwidths))
        uw = [padded_t(w, upads[i], upads[i + 1], dtype) for i, w in enumerate(unit_weights)]
        ub = [padded_vec(bb, upads[i + 1], like=hist) for i, bb in enumerate(unit_biases)]
        k["uw"] = uw + [dummy_w] * (MAX_UNIT_LAYERS - 1 - len(uw))
        k["ub"] = ub + [dummy] * (MAX_UNIT_LAYERS - 1 - len(ub))
        k["uwo"] = padded_vec(unit_w_out, upads[len(uwidths) - 1], like=hist)
        k["ubo"] = unit_b_out.detach().reshape(1).float()
        k["wx"] = padded_t(wx, k["dp"], upads[0], dtype)
        k["a1"], k["nu"], k["upads"] = a1, len(uwidths), upads
    else:
        k["uw"], k["ub"], k["uwo"], k["ubo"], k["wx"] = [dummy_w] * 2, [dummy] * 2, dummy, dummy, dummy_w
        k["a1"], k["nu"], k["upads"] = 0, 1, [16] * MAX_UNIT_LAYERS
    k["act"] = act
    return k


def _launch(hist, ht, lengths, q, qt, cq, idx, a, b_out, k):
    """Contiguous tensors, candidate strides and shape constants shared by both kernels."""
    B, L, D = hist.shape
    hist = hist.contiguous() if L else hist.new_zeros(B, 1, D)
    if k["a1"]:
        ht = ht.contiguous() if L else ht.new_zeros(B, 1, k["a1"])
        qt = qt.contiguous()
    else:
        ht, qt = hist, q
    q, cq, a = q.contiguous(), cq.contiguous(), a.contiguous()
    if idx is None:
        idx_t, sib, sin = lengths, 0, 0
    else:
        idx_t, sib, sin = idx, (0 if idx.dim() == 1 else idx.stride(0)), idx.stride(-1)
    tensors = [
        hist,
        ht,
        lengths,
        q,
        qt,
        cq,
        idx_t,
        k["wx"],
        k["uw"][0],
        k["ub"][0],
        k["uw"][1],
        k["ub"][1],
        k["uwo"],
        k["ubo"],
        a,
        k["wp"],
        k["w"][0],
        k["b"][0],
        k["w"][1],
        k["b"][1],
        k["w"][2],
        k["b"][2],
        k["wo"],
        b_out.detach().reshape(1).float(),
    ]
    strides = [
        hist.stride(0),
        hist.stride(1),
        ht.stride(0),
        ht.stride(1),
        q.stride(0),
        qt.stride(0),
        cq.stride(0),
        a.stride(0),
        sib,
        sin,
    ]
    p, up = k["pads"], k["upads"]
    meta = dict(
        KIND=k["kind"],
        NORMALIZE=k["normalize"],
        NU=k["nu"],
        DP=k["dp"],
        A1P=up[0],
        A2P=up[1],
        A3P=up[2],
        NL=k["nl"],
        H1P=p[0],
        H2P=p[1],
        H3P=p[2],
        H4P=p[3],
        ACT=k["act"],
        HAS_IDX=idx is not None,
        PREC=k["precision"],
    )
    return tensors, strides, meta


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
    k = _prepare(
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
    )
    k.update(kind=KINDS[kind], normalize=bool(normalize), precision=precision)
    B, L, D = hist.shape
    N = q.shape[0] if idx is None else idx.shape[-1]
    out = torch.empty(B, N, dtype=hist.dtype, device=hist.device)
    if B == 0 or N == 0:
        return out
    tensors, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, b_out, k)

    def grid(m):
        return (B * triton.cdiv(N, m["BLOCK_N"]),)

    _attn_fwd_kernel[grid](
        *tensors, out, B, N, D, k["a1"], a.shape[1], float(scale), *strides, out.stride(0), _n_key(N), **meta
    )
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
    k = _prepare(
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
    )
    k.update(kind=KINDS[kind], normalize=bool(normalize), precision=precision)
    B, L, D = hist.shape
    N = q.shape[0] if idx is None else idx.shape[-1]
    topk, r, splits, chunk, keys = topk_mod.launch_plan(B, N, topk, 16 if INTERPRET else 32, splits, excl, hist.device)
    if B and N and topk:
        tensors, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, b_out, k)
        excl_t = excl.contiguous() if excl is not None else lengths
        _attn_topk_kernel[(B * splits,)](
            *tensors,
            excl_t,
            keys,
            B,
            N,
            D,
            k["a1"],
            a.shape[1],
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
    k = _prepare(
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
    )
    k.update(kind=KINDS[kind], normalize=bool(normalize), precision=precision)
    B, L, D = hist.shape
    N = q.shape[0] if idx is None else idx.shape[-1]
    f32 = dict(dtype=torch.float32, device=hist.device)
    p, up, dp = k["pads"], k["upads"], k["dp"]
    a1 = k["a1"]
    d_hist = torch.zeros(B, max(L, 1), D, **f32)
    d_ht = torch.zeros(B, max(L, 1), max(a1, 1), **f32)
    d_q = torch.zeros(q.shape, **f32)
    d_qt = torch.zeros(q.shape[0], max(a1, 1), **f32)
    d_cq = torch.zeros(cq.shape, **f32)
    d_a = torch.zeros(a.shape, **f32)
    # Weight and bias gradients: one private slot per program of the persistent kernel.
    slots = backward_programs(B * triton.cdiv(N, 16) if B and N else 1, hist.device)
    aulp, hlp = up[k["nu"] - 1], p[k["nl"] - 1]
    d_wx = torch.zeros(slots, dp, up[0], **f32)
    d_uw = [torch.zeros(slots, up[i], up[i + 1], **f32) for i in range(2)]
    d_ub = [torch.zeros(slots, up[i + 1], **f32) for i in range(2)]
    d_uwo = torch.zeros(slots, aulp, **f32)
    d_ubo = torch.zeros(slots, **f32)
    d_wp = torch.zeros(slots, dp, p[0], **f32)
    d_w = [torch.zeros(slots, p[i], p[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    d_b = [torch.zeros(slots, p[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    d_wo = torch.zeros(slots, hlp, **f32)
    d_bo = torch.zeros(slots, **f32)
    if B and N:
        tensors, strides, meta = _launch(hist, ht, lengths, q, qt, cq, idx, a, b_out, k)
        grad = grad.contiguous()
        h_c, ht_c, q_c, qt_c = tensors[0], tensors[1], tensors[3], tensors[4]
        # The gradient buffers share the strides of the tensors the kernel reads.
        assert d_hist.stride() == h_c.stride() and d_q.stride() == q_c.stride() and d_cq.stride() == tensors[5].stride()
        if a1:
            assert d_ht.stride() == ht_c.stride() and d_qt.stride() == qt_c.stride()

        def grid(m):
            return (backward_programs(B * triton.cdiv(N, m["BLOCK_N"]), hist.device),)

        _attn_bwd_kernel[grid](
            *tensors,
            grad,
            d_hist,
            d_ht,
            d_q,
            d_qt,
            d_cq,
            d_wx,
            d_uw[0],
            d_ub[0],
            d_uw[1],
            d_ub[1],
            d_uwo,
            d_ubo,
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
            D,
            a1,
            a.shape[1],
            float(scale),
            *strides,
            grad.stride(0),
            _n_key(N),
            SHARED=idx is None or idx.dim() == 1,
            AULP=aulp,
            HLP=hlp,
            **meta,
        )
    d_wx, d_uwo, d_wp, d_wo = d_wx.sum(0), d_uwo.sum(0), d_wp.sum(0), d_wo.sum(0)
    d_uw, d_ub = [t.sum(0) for t in d_uw], [t.sum(0) for t in d_ub]
    d_w, d_b = [t.sum(0) for t in d_w], [t.sum(0) for t in d_b]
    d_ubo, d_bo = d_ubo.sum(0, keepdim=True), d_bo.sum(0, keepdim=True)

    def back(t, like):
        return t.to(like.dtype)

    widths = [a.shape[1]] + [w.shape[0] for w in weights]
    out = {
        "hist": back(d_hist[:, :L], hist),
        "q": back(d_q, q),
        "cq": back(d_cq, cq),
        "a": back(d_a, a),
        "wp": back(d_wp[:D, : widths[0]].t().contiguous(), wp),
        "weights": [back(d_w[i][: widths[i], : widths[i + 1]].t().contiguous(), w) for i, w in enumerate(weights)],
        "biases": [back(d_b[i][: widths[i + 1]], bb) for i, bb in enumerate(biases)],
        "w_out": back(d_wo[: widths[-1]], w_out),
        "b_out": back(d_bo.reshape(b_out.shape), b_out),
    }
    if kind == "din":
        uwidths = [a1] + [w.shape[0] for w in unit_weights]
        out.update(
            ht=back(d_ht[:, :L], ht),
            qt=back(d_qt, qt),
            wx=back(d_wx[:D, :a1].t().contiguous(), wx),
            unit_weights=[
                back(d_uw[i][: uwidths[i], : uwidths[i + 1]].t().contiguous(), w) for i, w in enumerate(unit_weights)
            ],
            unit_biases=[back(d_ub[i][: uwidths[i + 1]], bb) for i, bb in enumerate(unit_biases)],
            unit_w_out=back(d_uwo[: uwidths[-1]], unit_w_out),
            unit_b_out=back(d_ubo.reshape(unit_b_out.shape), unit_b_out),
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
):
    """Fused score + top-K: each user's best ``k`` candidate ``(positions, values)`` ``[B, k]``
    (rules of :func:`rankfast.topk`); arguments as :func:`target_attention_score`, plus
    ``exclude_mask`` and ``splits`` as in :func:`rankfast.kernels.mlp_score.mlp_score_topk`."""
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
    """
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
