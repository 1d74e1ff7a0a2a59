"""Fused MLP scoring (MLPModel, NeuMF): forward, backward and score + top-K.

The first layer is split (docs/design.md): ``A = E_u W1u^T + b1`` per user
``[B, H1]`` and ``C = E_i W1i^T`` per item ``[M, H1]`` are computed outside
(small). A tile is ``BLOCK_U`` users x ``BLOCK_N`` candidates (``BLOCK_P``
pairs, one row each); in registers it forms ``act(A_u + C_i)`` in chunks of
``BJ`` units, feeding each chunk straight into the next layer's ``tl.dot``;
later layers follow (up to 3 after the first, widths up to 512), then the
output layer, NeuMF's GMF term (a per-pair dot of ``g_u * w_gmf`` and
``g_i``) and the score write. No per-pair tensor ever reaches global memory.
The forward is persistent: each program walks tiles ``pid, pid + P, ...``,
keeping the weights it re-reads for every tile in cache (``evict_last``).

Layer chunking: with hidden widths ``H1..H4`` only ``h2`` (and ``h4``) are
held at full width; ``h1`` and ``h3`` exist one ``BJ`` chunk at a time, each
chunk multiplied into the next layer's accumulator (the flash-MLP pattern),
so weights are read in ``[BJ, H]`` slices, from the ``nn.Linear`` weights
themselves (``[out, in]``; no padded copies, see ``_common``).

Backward recomputes the pair activations tile by tile (nothing per pair is
stored) and accumulates without atomics (``_common.accumulate``): the
programs form ``G`` user groups x ``C`` candidate groups
(``_common.ownership``); each adds its tiles' weight and bias gradients into
its own slot (a split-K reduction over pairs), ``A`` rows (summed over the
tile's candidates) into its slot of a ``[C, B, H1]`` workspace and ``C`` rows
(summed over the tile's users) into its slot of a ``[G, M, H1]`` workspace
(shared candidates) or straight into the pair's row (per-user candidates,
whose ``[B, N]`` rows are then added into the items' rows by
``index_put_(accumulate=True)``, deterministic under
``torch.use_deterministic_algorithms``). The slots are summed in a fixed
order, so gradients repeat bit for bit.

Public entry points (registered as ``torch.ops.rankfast.*``):

* :func:`mlp_score` - the op on precomputed ``A``, ``C`` and the layers' weights (differentiable);
* :func:`mlp_score_topk` - fused score + top-K (see ``kernels/topk.py``).

Models are turned into these arguments by the fused scoring backend
(``rankfast.scoring.backends.fused``); the kernels know nothing of models.
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
    ownership,
    pad_width,
    programs,
    weight_arg,
)
from rankfast.kernels.topk import excluded, merge, store_keys, tile_keys

MAX_LAYERS = 4  # hidden layers in all: the split first one plus up to 3


def _configs(backward: bool):
    """``TILE_U``: the fewest users a tile spans (see ``_tile_heuristics``); above 1 a tile is
    a 2-D block of users x candidates, whose A and C rows are each read by several pairs."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32, "BJ": 16, "TILE_U": 1}, num_warps=4, num_stages=1)]
    if backward:  # 64 pairs on 8 warps: 128 pairs, or 64 on 4 warps, spill (bench/kernel_report.py)
        out = [triton.Config({"BLOCK_P": 64, "BJ": 32, "TILE_U": tu}, num_warps=8, num_stages=2) for tu in (1, 4)]
    else:  # a few candidates: every one is compiled and timed per new shape
        out = [
            triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 1}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BJ": 64, "TILE_U": 4}, num_warps=4, num_stages=3),
        ]
    return configs(out, out[0])


def _tile_heuristics():
    def block_n(a):
        return min(a["BLOCK_P"] // a["TILE_U"], triton.next_power_of_2(max(1, a["N"])))

    return {
        "BLOCK_N": block_n,
        "BLOCK_U": lambda a: a["BLOCK_P"] // block_n(a),
        "BJ1": lambda a: min(a["BJ"], a["H1P"]),
        "BJ3": lambda a: min(a["BJ"], a["H3P"]),
    }


_KEY = ["N_KEY", "H1P", "H2P", "H3P", "H4P", "GP", "NL", "ACT", "HAS_IDX", "HAS_GMF"]


# --- device code ---------------------------------------------------------------------


@triton.jit
def _tile(
    tile,
    B,
    N,
    IDX,
    stride_ib,
    stride_in,
    BLOCK_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """Pair rows of tile ``tile``: user, candidate position, item row, mask (all ``[BLOCK_P]``)."""
    num_n = tl.cdiv(N, BLOCK_N)
    return _block(
        tile // num_n,
        tile % num_n,
        B,
        N,
        IDX,
        stride_ib,
        stride_in,
        BLOCK_U,
        BLOCK_N,
        HAS_IDX,
    )


@triton.jit
def _block(
    pid_u,
    pid_n,
    B,
    N,
    IDX,
    stride_ib,
    stride_in,
    BLOCK_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
):
    """Pair rows of user block ``pid_u`` x candidate block ``pid_n``: user, candidate position,
    item row, mask (all ``[BLOCK_P]``)."""
    p = tl.arange(0, BLOCK_U * BLOCK_N)
    u = pid_u * BLOCK_U + p // BLOCK_N
    n = pid_n * BLOCK_N + p % BLOCK_N
    rmask = (u < B) & (n < N)
    u64 = u.to(tl.int64)
    item = item_rows(IDX, u64, n, rmask, stride_ib, stride_in, HAS_IDX)
    return u64, n, item, rmask


@triton.jit
def _z1(
    a_row,
    c_row,
    rmask,
    cj,
    H1,
    D,
    WPS,
    pooled,
    WP,
    HAS_POOL: tl.constexpr,
    PREC: tl.constexpr,
):
    """First-layer pre-activations of the tile's pairs for units ``cj``: ``A_u + C_i`` in fp32
    (bf16 terms are loaded as bf16, half the bytes, and added exactly), plus,
    for target attention, the pooled history's term ``pooled @ WP[cj, :]^T`` (fp32; ``WP [H1, D]``,
    row stride ``WPS``)."""
    m = rmask[:, None] & (cj[None, :] < H1)
    a = tl.load(a_row[:, None] + cj[None, :], mask=m, other=0.0)
    c = tl.load(c_row[:, None] + cj[None, :], mask=m, other=0.0)
    z = a.to(tl.float32) + c.to(tl.float32)
    if HAS_POOL:
        dd = tl.arange(0, pooled.shape[1])
        wp = tl.load(
            WP + cj[None, :] * WPS + dd[:, None],
            mask=(cj[None, :] < H1) & (dd[:, None] < D),
            other=0.0,
        )
        z = dot(cast(pooled, wp.dtype), wp, z, PREC=PREC)
    return z


@triton.jit
def _h2(
    a_row,
    c_row,
    rmask,
    H1,
    H2,
    D,
    WPS,
    pooled,
    WP,
    HAS_POOL: tl.constexpr,
    W2,
    B2,
    H2P: tl.constexpr,
    BJ1: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Second hidden layer at full width: ``(z2, act(z2))``, ``[BLOCK_P, H2P]`` fp32."""
    c2 = tl.arange(0, H2P)
    m2 = c2 < H2
    acc = tl.zeros([BLOCK_P, H2P], dtype=tl.float32)
    for j in range(0, H1, BJ1):
        cj = j + tl.arange(0, BJ1)
        a1 = act_fn(_z1(a_row, c_row, rmask, cj, H1, D, WPS, pooled, WP, HAS_POOL, PREC), ACT)
        w = tl.load(
            W2 + c2[None, :] * H1 + cj[:, None],
            mask=m2[None, :] & (cj[:, None] < H1),
            other=0.0,
            eviction_policy="evict_last",
        )
        acc = dot(cast(a1, w.dtype), w, acc, PREC=PREC)
    z2 = acc + tl.load(B2 + c2, mask=m2, other=0.0).to(tl.float32)[None, :]
    return z2, act_fn(z2, ACT)


@triton.jit
def _vec(PTR, cols, n):
    """A bias or output-weight vector as fp32, zero past its width ``n``."""
    return tl.load(PTR + cols, mask=cols < n, other=0.0, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _w3(W3, c2, cj, H2, H3):
    """``W3[cj, :]^T``: ``[H2P, BJ3]`` from the ``[H3, H2]`` weight."""
    return tl.load(
        W3 + cj[None, :] * H2 + c2[:, None],
        mask=(cj[None, :] < H3) & (c2[:, None] < H2),
        other=0.0,
        eviction_policy="evict_last",
    )


@triton.jit
def _w4(W4, cj, c4, H3, H4):
    """``W4[:, cj]^T``: ``[BJ3, H4P]`` from the ``[H4, H3]`` weight."""
    return tl.load(
        W4 + c4[None, :] * H3 + cj[:, None],
        mask=(c4[None, :] < H4) & (cj[:, None] < H3),
        other=0.0,
        eviction_policy="evict_last",
    )


@triton.jit
def _out(acc, h, WO, cols, H, NC, CP: tl.constexpr, PREC: tl.constexpr):
    """The output layer on hidden units ``cols`` (activations ``h``, of ``H``), added to ``acc``
    unless it is None: one unit (``CP`` 0; ``WO [H]``, a ``[BLOCK_P]`` sum) or ``NC`` class units
    padded to ``CP`` (``WO [NC, H]``, a ``[BLOCK_P, CP]`` ``tl.dot``)."""
    if CP == 0:
        out = tl.sum(h * _vec(WO, cols, H)[None, :], axis=1)
        if acc is not None:
            out = acc + out
    else:
        k = tl.arange(0, CP)
        w = tl.load(
            WO + k[None, :] * H + cols[:, None],
            mask=(k[None, :] < NC) & (cols[:, None] < H),
            other=0.0,
            eviction_policy="evict_last",
        )
        out = dot(cast(h, w.dtype), w, acc, PREC=PREC)
    return out


@triton.jit
def _mlp_pairs(
    a_row,
    c_row,
    rmask,
    H1,
    H2,
    H3,
    H4,
    D,
    WPS,
    pooled,
    WP,
    HAS_POOL: tl.constexpr,
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
    BLOCK_P: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
    NC=1,
    CP: tl.constexpr = 0,
):
    """The MLP on the tile's pairs, without the output bias: ``[BLOCK_P]`` fp32, or with a class
    head (``CP > 0``: ``NC`` output units, ``WO [NC, H_last]``) the logits ``[BLOCK_P, CP]``, zero
    past ``NC`` (see :func:`_out`; ``CP`` 0 compiles the head out)."""
    if CP == 0:
        score = tl.zeros([BLOCK_P], dtype=tl.float32)
    else:
        score = tl.zeros([BLOCK_P, CP], dtype=tl.float32)
    if NL == 1:
        for j in range(0, H1, BJ1):
            cj = j + tl.arange(0, BJ1)
            a1 = act_fn(_z1(a_row, c_row, rmask, cj, H1, D, WPS, pooled, WP, HAS_POOL, PREC), ACT)
            score = _out(score, a1, WO, cj, H1, NC, CP, PREC)
    else:
        z2, h2 = _h2(
            a_row,
            c_row,
            rmask,
            H1,
            H2,
            D,
            WPS,
            pooled,
            WP,
            HAS_POOL,
            W2,
            B2,
            H2P,
            BJ1,
            BLOCK_P,
            ACT,
            PREC,
        )
        c2 = tl.arange(0, H2P)
        if NL == 2:
            score = _out(None, h2, WO, c2, H2, NC, CP, PREC)
        else:
            h2c = cast(h2, W3.dtype.element_ty)
            c4 = tl.arange(0, H4P)
            acc4 = tl.zeros([BLOCK_P, H4P], dtype=tl.float32)
            for j in range(0, H3, BJ3):
                cj = j + tl.arange(0, BJ3)
                a3 = act_fn(
                    dot(h2c, _w3(W3, c2, cj, H2, H3), PREC=PREC) + _vec(B3, cj, H3)[None, :],
                    ACT,
                )
                if NL == 3:
                    score = _out(score, a3, WO, cj, H3, NC, CP, PREC)
                else:
                    w4 = _w4(W4, cj, c4, H3, H4)
                    acc4 = dot(cast(a3, w4.dtype), w4, acc4, PREC=PREC)
            if NL == 4:
                h4 = act_fn(acc4 + _vec(B4, c4, H4)[None, :], ACT)
                score = _out(None, h4, WO, c4, H4, NC, CP, PREC)
    return score


@triton.jit
def _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP: tl.constexpr):
    cg = tl.arange(0, GP)
    m = rmask[:, None] & (cg[None, :] < G)
    gu = tl.load(GU + u64[:, None] * stride_gu + cg[None, :], mask=m, other=0.0).to(tl.float32)
    gi = tl.load(GI + item[:, None] * stride_gi + cg[None, :], mask=m, other=0.0).to(tl.float32)
    return gu, gi


@triton.jit
def _mlp_scores(
    A,
    C,
    GU,
    GI,
    u64,
    item,
    rmask,
    stride_a,
    stride_c,
    stride_gu,
    stride_gi,
    H1,
    H2,
    H3,
    H4,
    G,
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
    GP: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    BLOCK: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GMF: tl.constexpr,
    PREC: tl.constexpr,
):
    """MLPModel's / NeuMF's score of pairs ``(u64, item)`` without the output bias, ``[BLOCK]``
    fp32: the MLP on the split first layer's rows, plus the GMF term; what the score kernel
    stores and its top-K twin ranks."""
    score = _mlp_pairs(
        A + u64 * stride_a,
        C + item * stride_c,
        rmask,
        H1,
        H2,
        H3,
        H4,
        0,
        0,
        0.0,
        WO,
        False,
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
        BLOCK,
        ACT,
        PREC,
    )
    if HAS_GMF:
        gu, gi = _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP)
        score += tl.sum(gu * gi, axis=1)
    return score


@triton.autotune(configs=_configs(False), key=_KEY)
@triton.heuristics(_tile_heuristics())
@triton.jit
def _mlp_fwd_kernel(
    A,
    C,
    IDX,
    GU,
    GI,
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
    H1,
    H2,
    H3,
    H4,
    G,
    stride_a,
    stride_c,
    stride_ib,
    stride_in,
    stride_gu,
    stride_gi,
    stride_ob,
    N_KEY,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    GP: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_GMF: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BJ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    TILE_U: tl.constexpr,
):
    """Persistent: program ``pid`` scores tiles ``pid, pid + P, ...`` (``P`` programs)."""
    num_tiles = tl.cdiv(B, BLOCK_U) * tl.cdiv(N, BLOCK_N)
    bo = tl.load(BO).to(tl.float32)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        u64, n, item, rmask = _tile(tile, B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
        score = _mlp_scores(
            A,
            C,
            GU,
            GI,
            u64,
            item,
            rmask,
            stride_a,
            stride_c,
            stride_gu,
            stride_gi,
            H1,
            H2,
            H3,
            H4,
            G,
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
            GP,
            BJ1,
            BJ3,
            BLOCK_P,
            ACT,
            HAS_GMF,
            PREC,
        )
        tl.store(
            OUT + u64 * stride_ob + n,
            cast(score + bo, OUT.dtype.element_ty),
            mask=rmask,
        )


@triton.jit
def _add_user_rows(WS, width, vals, cols, pid_u, B, BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds per-pair rows ``vals [BLOCK_P, W]`` (columns ``cols`` of ``width``), summed over the
    tile's candidates, into its users' rows of ``WS`` (this program's slot, ``[B, width]``)."""
    v = tl.sum(tl.reshape(vals, (BLOCK_U, BLOCK_N, vals.shape[1])), axis=1)
    uu = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    accumulate(
        WS + uu.to(tl.int64)[:, None] * width + cols[None, :],
        v,
        (uu < B)[:, None] & (cols[None, :] < width),
    )


@triton.jit
def _add_cand_rows(
    WS,
    width,
    vals,
    cols,
    u64,
    n,
    rmask,
    pid_n,
    N,
    BLOCK_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SHARED: tl.constexpr,
):
    """Adds per-pair rows ``vals [BLOCK_P, W]`` into the candidates' rows of ``WS`` (this
    program's slot), by candidate position: ``[N, width]`` summed over the tile's users when
    every user has the same candidates (``SHARED``), else each pair's own row ``[B, N, width]``.
    (The host adds positions into item rows, so a candidate listed twice is no race.)"""
    if SHARED:
        v = tl.sum(tl.reshape(vals, (BLOCK_U, BLOCK_N, vals.shape[1])), axis=0)
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        accumulate(
            WS + nn.to(tl.int64)[:, None] * width + cols[None, :],
            v,
            (nn < N)[:, None] & (cols[None, :] < width),
        )
    else:
        pair = u64 * N + n
        tl.store(
            WS + pair[:, None] * width + cols[None, :],
            vals,
            mask=rmask[:, None] & (cols[None, :] < width),
        )


@triton.jit
def _tail_bwd(
    a_row,
    c_row,
    rmask,
    u64,
    n,
    item,
    go,
    H1,
    H2,
    H3,
    H4,
    D,
    WPS,
    pooled,
    WP,
    DWP,
    HAS_POOL: tl.constexpr,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    DA,
    DC,
    DW2,
    DB2,
    DW3,
    DB3,
    DW4,
    DB4,
    DWO,
    pid_u,
    pid_n,
    B,
    N,
    IDX,
    stride_ib,
    stride_in,
    NL: tl.constexpr,
    H2P: tl.constexpr,
    H4P: tl.constexpr,
    DP: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SHARED: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward of the MLP on the tile's pairs given ``go = d score [BLOCK_P]``: adds (into this
    program's slots, see ``_add_user_rows`` and ``_add_cand_rows``) the gradients of every layer after the first, in
    ``nn.Linear`` layout, of ``A`` rows (users) and ``C`` rows (candidates), and with ``HAS_POOL``
    of the pooled block ``WP [H1, D]``; returns ``d pooled [BLOCK_P, DP]`` (zeros without it).
    Weight gradients are computed as ``dz^T @ activation`` so that the dot's M is a layer's width."""
    dd = tl.arange(0, DP)
    dpooled = tl.zeros([BLOCK_P, DP], dtype=tl.float32)
    c2 = tl.arange(0, H2P)
    m2 = c2 < H2
    if NL >= 2:
        # Step 1: recompute layer 2 (and the layers after it) and backpropagate to dz2.
        z2, h2 = _h2(
            a_row,
            c_row,
            rmask,
            H1,
            H2,
            D,
            WPS,
            pooled,
            WP,
            HAS_POOL,
            W2,
            B2,
            H2P,
            BJ1,
            BLOCK_P,
            ACT,
            PREC,
        )
        if NL == 2:
            accumulate(DWO + c2, tl.sum(h2 * go[:, None], axis=0), m2)
            dz2 = go[:, None] * _vec(WO, c2, H2)[None, :] * act_grad(z2, ACT)
        else:
            h2c = cast(h2, W3.dtype.element_ty)
            c4 = tl.arange(0, H4P)
            m4 = c4 < H4
            if NL == 4:
                # Recompute h4, then its gradient.
                acc4 = tl.zeros([BLOCK_P, H4P], dtype=tl.float32)
                for j in range(0, H3, BJ3):
                    cj = j + tl.arange(0, BJ3)
                    a3 = act_fn(
                        dot(h2c, _w3(W3, c2, cj, H2, H3), PREC=PREC) + _vec(B3, cj, H3)[None, :],
                        ACT,
                    )
                    w4 = _w4(W4, cj, c4, H3, H4)
                    acc4 = dot(cast(a3, w4.dtype), w4, acc4, PREC=PREC)
                z4 = acc4 + _vec(B4, c4, H4)[None, :]
                h4 = act_fn(z4, ACT)
                accumulate(DWO + c4, tl.sum(h4 * go[:, None], axis=0), m4)
                dz4 = go[:, None] * _vec(WO, c4, H4)[None, :] * act_grad(z4, ACT)
                accumulate(DB4 + c4, tl.sum(dz4, axis=0), m4)
                dz4c = cast(dz4, W4.dtype.element_ty)
            dh2 = tl.zeros([BLOCK_P, H2P], dtype=tl.float32)
            for j in range(0, H3, BJ3):
                cj = j + tl.arange(0, BJ3)
                mj = cj < H3
                w3 = _w3(W3, c2, cj, H2, H3)
                z3 = dot(h2c, w3, PREC=PREC) + _vec(B3, cj, H3)[None, :]
                a3 = act_fn(z3, ACT)
                if NL == 3:
                    accumulate(DWO + cj, tl.sum(a3 * go[:, None], axis=0), mj)
                    da3 = go[:, None] * _vec(WO, cj, H3)[None, :]
                else:
                    w4 = _w4(W4, cj, c4, H3, H4)
                    dw4 = dot(tl.trans(dz4c), cast(a3, w4.dtype), PREC=PREC)  # [H4P, BJ3] = DW4[:, cj]
                    accumulate(
                        DW4 + c4[:, None] * H3 + cj[None, :],
                        dw4,
                        m4[:, None] & mj[None, :],
                    )
                    da3 = dot(dz4c, tl.trans(w4), PREC=PREC)
                dz3 = da3 * act_grad(z3, ACT)
                accumulate(DB3 + cj, tl.sum(dz3, axis=0), mj)
                dz3c = cast(dz3, w3.dtype)
                dw3t = dot(tl.trans(h2c), dz3c, PREC=PREC)  # [H2P, BJ3] = DW3[cj, :]^T
                accumulate(
                    DW3 + cj[None, :] * H2 + c2[:, None],
                    dw3t,
                    m2[:, None] & mj[None, :],
                )
                dh2 = dot(dz3c, tl.trans(w3), dh2, PREC=PREC)
            dz2 = dh2 * act_grad(z2, ACT)
        accumulate(DB2 + c2, tl.sum(dz2, axis=0), m2)
        dz2c = cast(dz2, W2.dtype.element_ty)

    # Step 2: per chunk of the first layer's units, recompute them, add DW2's columns, and
    # backpropagate to dz1, whose rows are the A and C gradients.
    for j in range(0, H1, BJ1):
        cj = j + tl.arange(0, BJ1)
        mj = cj < H1
        z1 = _z1(a_row, c_row, rmask, cj, H1, D, WPS, pooled, WP, HAS_POOL, PREC)
        a1 = act_fn(z1, ACT)
        if NL == 1:
            accumulate(DWO + cj, tl.sum(a1 * go[:, None], axis=0), mj)
            da1 = go[:, None] * _vec(WO, cj, H1)[None, :]
        else:
            w2 = tl.load(
                W2 + c2[None, :] * H1 + cj[:, None],
                mask=m2[None, :] & mj[:, None],
                other=0.0,
            )
            dw2 = dot(tl.trans(dz2c), cast(a1, w2.dtype), PREC=PREC)  # [H2P, BJ1] = DW2[:, cj]
            accumulate(DW2 + c2[:, None] * H1 + cj[None, :], dw2, m2[:, None] & mj[None, :])
            da1 = dot(dz2c, tl.trans(w2), PREC=PREC)
        dz1 = da1 * act_grad(z1, ACT)
        if HAS_POOL:
            wp = tl.load(
                WP + cj[None, :] * WPS + dd[:, None],
                mask=mj[None, :] & (dd[:, None] < D),
                other=0.0,
            )
            dz1c = cast(dz1, wp.dtype)
            dwpt = dot(tl.trans(cast(pooled, wp.dtype)), dz1c, PREC=PREC)  # [DP, BJ1] = DWP[cj, :]^T
            accumulate(
                DWP + cj[None, :] * D + dd[:, None],
                dwpt,
                mj[None, :] & (dd[:, None] < D),
            )
            dpooled = dot(dz1c, tl.trans(wp), dpooled, PREC=PREC)
        _add_user_rows(DA, H1, dz1, cj, pid_u, B, BLOCK_U, BLOCK_N)
        _add_cand_rows(DC, H1, dz1, cj, u64, n, rmask, pid_n, N, BLOCK_U, BLOCK_N, SHARED)
    return dpooled


@triton.autotune(
    configs=_configs(True),
    key=_KEY + ["SHARED"],
    reset_to_zero=[
        "DA",
        "DC",
        "DGU",
        "DGI",
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
@triton.heuristics(_tile_heuristics())
@triton.jit
def _mlp_bwd_kernel(
    A,
    C,
    IDX,
    GU,
    GI,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WO,
    GOUT,
    DA,
    DC,
    DGU,
    DGI,
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
    H1,
    H2,
    H3,
    H4,
    HL,
    G,
    GROUPS_U,
    GROUPS_N,
    stride_a,
    stride_c,
    stride_ib,
    stride_in,
    stride_gu,
    stride_gi,
    stride_go,
    N_KEY,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    GP: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_GMF: tl.constexpr,
    SHARED: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BJ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    TILE_U: tl.constexpr,
):
    """Program ``(g, c)`` of ``GROUPS_U x GROUPS_N`` takes the tiles of user blocks ``g, g + GROUPS_U,
    ...`` x candidate blocks ``c, c + GROUPS_N, ...`` in that order, and adds their gradients into
    its own slots: weights ``DW*``/``DB*``/``DWO``/``DBO`` ``[programs, ...]``, user rows ``DA``,
    ``DGU`` ``[GROUPS_N, B, .]``, candidate rows ``DC``, ``DGI`` ``[GROUPS_U, N, .]`` (shared
    candidates) or ``[B, N, .]`` (per pair). No atomics; the host sums the slots."""
    pid = tl.program_id(0)
    g = pid // GROUPS_N
    c = pid % GROUPS_N
    slot = pid.to(tl.int64)
    DW2 += slot * (H2 * H1)
    DB2 += slot * H2
    DW3 += slot * (H3 * H2)
    DB3 += slot * H3
    DW4 += slot * (H4 * H3)
    DB4 += slot * H4
    DWO += slot * HL
    DBO += slot
    DA += c.to(tl.int64) * B * H1
    DGU += c.to(tl.int64) * B * G
    if SHARED:
        DC += g.to(tl.int64) * N * H1
        DGI += g.to(tl.int64) * N * G
    for pid_u in range(g, tl.cdiv(B, BLOCK_U), GROUPS_U):
        for pid_n in range(c, tl.cdiv(N, BLOCK_N), GROUPS_N):
            tl.debug_barrier()  # the previous tile's slot updates are visible to every thread
            u64, n, item, rmask = _block(pid_u, pid_n, B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
            go = tl.load(GOUT + u64 * stride_go + n, mask=rmask, other=0.0).to(tl.float32)  # [P]
            accumulate(DBO, tl.sum(go, axis=0))
            if HAS_GMF:
                cg = tl.arange(0, GP)
                gu, gi = _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP)
                _add_user_rows(DGU, G, go[:, None] * gi, cg, pid_u, B, BLOCK_U, BLOCK_N)
                _add_cand_rows(
                    DGI,
                    G,
                    go[:, None] * gu,
                    cg,
                    u64,
                    n,
                    rmask,
                    pid_n,
                    N,
                    BLOCK_U,
                    BLOCK_N,
                    SHARED,
                )
            _tail_bwd(
                A + u64 * stride_a,
                C + item * stride_c,
                rmask,
                u64,
                n,
                item,
                go,
                H1,
                H2,
                H3,
                H4,
                0,
                0,
                0.0,
                WO,
                WO,
                False,
                W2,
                B2,
                W3,
                B3,
                W4,
                B4,
                WO,
                DA,
                DC,
                DW2,
                DB2,
                DW3,
                DB3,
                DW4,
                DB4,
                DWO,
                pid_u,
                pid_n,
                B,
                N,
                IDX,
                stride_ib,
                stride_in,
                NL,
                H2P,
                H4P,
                16,
                BJ1,
                BJ3,
                BLOCK_P,
                BLOCK_U,
                BLOCK_N,
                HAS_IDX,
                SHARED,
                ACT,
                PREC,
            )


def _topk_configs():
    if INTERPRET:
        return [triton.Config({"BJ": 16}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BJ": 64}, num_warps=8, num_stages=2),
        triton.Config({"BJ": 32}, num_warps=8, num_stages=2),
    ]
    return configs(out, out[0])


@triton.autotune(configs=_topk_configs(), key=_KEY + ["R", "HAS_EXCL"])
@triton.heuristics({"BJ1": lambda a: min(a["BJ"], a["H1P"]), "BJ3": lambda a: min(a["BJ"], a["H3P"])})
@triton.jit
def _mlp_topk_kernel(
    A,
    C,
    IDX,
    GU,
    GI,
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
    H1,
    H2,
    H3,
    H4,
    G,
    K,
    CHUNK,
    stride_a,
    stride_c,
    stride_ib,
    stride_in,
    stride_gu,
    stride_gi,
    stride_e,
    N_KEY,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    GP: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_GMF: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    PREC: tl.constexpr,
    R: tl.constexpr,
    SPLITS: tl.constexpr,
    BJ: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
):
    """Score + top-K: program (user b, split s) scores candidates [s * CHUNK, (s + 1) * CHUNK) in tiles of R,
    keeping the best R keys, and writes the best K to ``OUT_KEYS[b, s]``."""
    pid = tl.program_id(0)
    b = pid // SPLITS
    split = pid % SPLITS
    b64 = b.to(tl.int64)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, N)
    bo = tl.load(BO).to(tl.float32)
    running = tl.full([R], -(2**63), dtype=tl.int64)
    u64 = b64 + tl.zeros([R], dtype=tl.int64)
    for n0 in range(start, end, R):
        n = n0 + tl.arange(0, R)
        nmask = n < end
        item = item_rows(IDX, b64, n, nmask, stride_ib, stride_in, HAS_IDX)
        score = _mlp_scores(
            A,
            C,
            GU,
            GI,
            u64,
            item,
            nmask,
            stride_a,
            stride_c,
            stride_gu,
            stride_gi,
            H1,
            H2,
            H3,
            H4,
            G,
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
            GP,
            BJ1,
            BJ3,
            R,
            ACT,
            HAS_GMF,
            PREC,
        )
        score = cast(score + bo, WO.dtype.element_ty).to(tl.float32)  # ranked as the unfused scores are
        eligible = nmask & (~excluded(EXCL, b64, stride_e, n, nmask, HAS_EXCL))
        running = merge(running, tile_keys(score, n, eligible))
    store_keys(running, OUT_KEYS, pid, K, R)


# --- host side -----------------------------------------------------------------------


class _Layers:
    """The layers after the split first one as the kernels read them: the ``nn.Linear``
    weights themselves (contiguous, no copies), their widths ``h`` and tile widths ``pads``;
    absent layers get a placeholder tensor and width 1 (the kernels never read them)."""

    def __init__(self, a, weights, biases, w_out, b_out, gu):
        self.nl = len(weights) + 1
        self.widths = [a.shape[1]] + [w.shape[0] for w in weights]
        absent = MAX_LAYERS - self.nl
        self.wo, self.bo = weight_arg(w_out), weight_arg(b_out).reshape(-1)
        self.w = [weight_arg(w) for w in weights] + [self.wo] * absent
        self.b = [weight_arg(b) for b in biases] + [self.wo] * absent
        self.h = self.widths + [1] * absent
        self.pads = [pad_width(w) for w in self.widths] + [16] * absent
        self.g = 0 if gu is None else gu.shape[1]
        self.gp = pad_width(max(1, self.g))

    def tensors(self):
        """``W2, B2, W3, B3, W4, B4, WO`` in the kernels' order."""
        return [t for pair in zip(self.w, self.b, strict=True) for t in pair] + [self.wo]

    def meta(self, act, idx, gu, precision):
        h1p, h2p, h3p, h4p = self.pads
        return dict(
            NL=self.nl,
            H1P=h1p,
            H2P=h2p,
            H3P=h3p,
            H4P=h4p,
            GP=self.gp,
            ACT=act,
            HAS_IDX=idx is not None,
            HAS_GMF=gu is not None,
            PREC=precision,
        )


def _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    """Shapes, dtypes and devices (no values: those checks need a device sync, see ``mlp_score``)."""
    check_dtype("w_out", w_out)
    dtype, device = w_out.dtype, a.device
    if a.dim() != 2 or c.dim() != 2 or a.shape[1] != c.shape[1]:
        raise ValueError(f"a, c: expected [B, H1] and [M, H1], got {tuple(a.shape)} and {tuple(c.shape)}")
    check_split_term("a", a, dtype)
    check_split_term("c", c, dtype)
    check_device("c", c, device)
    if not 1 <= len(weights) + 1 <= MAX_LAYERS or len(biases) != len(weights):
        raise ValueError(
            f"weights: expected 0..{MAX_LAYERS - 1} layers after the first with one bias each, "
            f"got {len(weights)} weights and {len(biases)} biases"
        )
    width = a.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise ValueError(
                f"weights[{i}]: expected [H, {width}] with bias [H], got {tuple(w.shape)}, {tuple(b.shape)}"
            )
        check_device(f"weights[{i}]", w, device)
        check_dtype(f"weights[{i}]", w, dtype)
        check_dtype(f"biases[{i}]", b, dtype)
        width = w.shape[0]
    widths = [a.shape[1]] + [w.shape[0] for w in weights]
    if max(widths) > MAX_WIDTH:
        raise ValueError(f"weights: layer widths up to {MAX_WIDTH} are supported, got {widths}")
    if w_out.shape != (width,):
        raise ValueError(f"w_out: expected [{width}] (the output layer's weights), got {tuple(w_out.shape)}")
    if b_out.numel() != 1:
        raise ValueError(f"b_out: expected one element, got shape {tuple(b_out.shape)}")
    check_index_layout(idx, a.shape[0], device)
    if (gu is None) != (gi is None):
        raise ValueError("gu, gi: give both GMF inputs or neither")
    if gu is not None:
        if (
            gu.dim() != 2
            or gi.dim() != 2
            or gu.shape[0] != a.shape[0]
            or gi.shape[0] != c.shape[0]
            or gu.shape[1] != gi.shape[1]
        ):
            raise ValueError(f"gu, gi: expected [B, G] and [M, G], got {tuple(gu.shape)} and {tuple(gi.shape)}")
        if gu.shape[1] > MAX_WIDTH:
            raise ValueError(f"gu: GMF width up to {MAX_WIDTH} is supported, got {gu.shape[1]}")
        check_dtype("gu", gu, dtype)
        check_dtype("gi", gi, dtype)
    act = check_activation(activation)
    check_precision(precision)
    return act


def _launch_args(a, c, idx, gu, gi):
    a = a.contiguous()
    c = c.contiguous()
    B = a.shape[0]
    if idx is None:
        N, stride_ib, stride_in, shared = c.shape[0], 0, 0, True
        idx_t = a
    else:
        idx_t = idx
        N = idx.shape[-1]
        shared = idx.dim() == 1
        stride_ib = 0 if shared else idx.stride(0)
        stride_in = idx.stride(-1)
    gu_t = a if gu is None else gu.contiguous()
    gi_t = a if gi is None else gi.contiguous()
    return a, c, idx_t, gu_t, gi_t, B, N, stride_ib, stride_in, shared


def _n_key(n):
    return min(triton.next_power_of_2(max(1, n)), 4096)


def _mlp_forward_impl(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    act = _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)
    lay = _Layers(a, weights, biases, w_out, b_out, gu)
    a, c, idx_t, gu_t, gi_t, B, N, sib, sin, _ = _launch_args(a, c, idx, gu, gi)
    out = torch.empty(B, N, dtype=w_out.dtype, device=a.device)
    if B == 0 or N == 0:
        return out
    cap = programs(a.device)

    def grid(meta):
        return (min(cap, triton.cdiv(B, meta["BLOCK_U"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    _mlp_fwd_kernel[grid](
        a,
        c,
        idx_t,
        gu_t,
        gi_t,
        *lay.tensors(),
        lay.bo,
        out,
        B,
        N,
        *lay.h,
        lay.g,
        a.stride(0),
        c.stride(0),
        sib,
        sin,
        gu_t.stride(0),
        gi_t.stride(0),
        out.stride(0),
        _n_key(N),
        **lay.meta(act, idx, gu, precision),
    )
    return out


def _to_rows(cand, idx, rows):
    """Candidate-position gradients ``cand [N, W]`` (or ``[B, N, W]``) as item-row gradients
    ``[rows, W]``: themselves without ``idx``, else added into the rows ``idx`` names
    (``index_put_(accumulate=True)``: deterministic under ``torch.use_deterministic_algorithms``)."""
    if idx is None:
        return cand
    out = cand.new_zeros(rows, cand.shape[-1])
    return out.index_put_((idx.reshape(-1),), cand.reshape(-1, cand.shape[-1]), accumulate=True)


def _mlp_backward_impl(grad, a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    act = _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)
    lay = _Layers(a, weights, biases, w_out, b_out, gu)
    a_c, c_c, idx_t, gu_t, gi_t, B, N, sib, sin, shared = _launch_args(a, c, idx, gu, gi)
    f32 = dict(dtype=torch.float32, device=a.device)
    h1, g = a.shape[1], max(1, lay.g)
    # Program groups and their slots (see _common.ownership): user rows [C, B, .], candidate rows
    # [G, N, .] (shared candidates) or one row per pair [B, N, .]; weights one slot per program.
    cand_bytes = 4 * N * (h1 + lay.g) if shared else 0
    groups_u, groups_n = ownership(programs(a.device), 4 * B * (h1 + lay.g), cand_bytes, B, triton.cdiv(N, 16))
    slots = groups_u * groups_n
    da = torch.zeros(groups_n, B, h1, **f32)
    dgu = torch.zeros(groups_n, B, g, **f32)
    dc = torch.zeros(groups_u if shared else B, N, h1, **f32)
    dgi = torch.zeros(groups_u if shared else B, N, g, **f32)
    h = lay.h
    dws = [torch.zeros(slots, h[i + 1], h[i], **f32) for i in range(MAX_LAYERS - 1)]
    dbs = [torch.zeros(slots, h[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    dwo = torch.zeros(slots, lay.widths[-1], **f32)
    dbo = torch.zeros(slots, **f32)
    grad = grad.contiguous()
    if B and N:
        _mlp_bwd_kernel[(slots,)](
            a_c,
            c_c,
            idx_t,
            gu_t,
            gi_t,
            *lay.tensors(),
            grad,
            da,
            dc,
            dgu,
            dgi,
            dws[0],
            dbs[0],
            dws[1],
            dbs[1],
            dws[2],
            dbs[2],
            dwo,
            dbo,
            B,
            N,
            *h,
            lay.widths[-1],
            lay.g,
            groups_u,
            groups_n,
            a_c.stride(0),
            c_c.stride(0),
            sib,
            sin,
            gu_t.stride(0),
            gi_t.stride(0),
            grad.stride(0),
            _n_key(N),
            SHARED=shared,
            **lay.meta(act, idx, gu, precision),
        )
    # The slots' sums, in a fixed order.
    dc = _to_rows(dc.sum(0) if shared else dc, idx, c.shape[0])
    d_weights = [dws[i].sum(0).to(w.dtype) for i, w in enumerate(weights)]
    d_biases = [dbs[i].sum(0).to(b.dtype) for i, b in enumerate(biases)]
    d_gu = None if gu is None else dgu.sum(0).to(gu.dtype)
    d_gi = None if gi is None else _to_rows(dgi.sum(0) if shared else dgi, idx, gi.shape[0]).to(gi.dtype)
    return (
        da.sum(0).to(a.dtype),
        dc.to(c.dtype),
        d_gu,
        d_gi,
        d_weights,
        d_biases,
        dwo.sum(0).to(w_out.dtype),
        dbo.sum(0, keepdim=True).reshape(b_out.shape).to(b_out.dtype),
    )


# --- PyTorch operators -----------------------------------------------------------------


@torch.library.custom_op("rankfast::mlp_score", mutates_args=())
def _mlp_score_op(
    a: torch.Tensor,
    c: torch.Tensor,
    idx: torch.Tensor | None,
    gu: torch.Tensor | None,
    gi: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    activation: str,
    precision: str,
) -> torch.Tensor:
    return _mlp_forward_impl(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)


@_mlp_score_op.register_fake
def _(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    n = c.shape[0] if idx is None else idx.shape[-1]
    return a.new_empty(a.shape[0], n, dtype=w_out.dtype)


@torch.library.custom_op("rankfast::mlp_score_backward", mutates_args=())
def _mlp_score_backward_op(
    grad: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    idx: torch.Tensor | None,
    gu: torch.Tensor | None,
    gi: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    activation: str,
    precision: str,
) -> list[torch.Tensor]:
    da, dc, dgu, dgi, dws, dbs, dwo, dbo = _mlp_backward_impl(
        grad, a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision
    )
    return [
        da,
        dc,
        a.new_empty(0) if dgu is None else dgu,
        a.new_empty(0) if dgi is None else dgi,
        dwo,
        dbo,
        *dws,
        *dbs,
    ]


@_mlp_score_backward_op.register_fake
def _(grad, a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    return [
        torch.empty_like(a),
        torch.empty_like(c),
        a.new_empty(0) if gu is None else torch.empty_like(gu),
        a.new_empty(0) if gi is None else torch.empty_like(gi),
        torch.empty_like(w_out),
        torch.empty_like(b_out),
        *[torch.empty_like(w) for w in weights],
        *[torch.empty_like(b) for b in biases],
    ]


def _setup_context(ctx, inputs, output):
    a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision = inputs
    ctx.save_for_backward(a, c, idx, gu, gi, w_out, b_out, *weights, *biases)
    ctx.num_layers = len(weights)
    ctx.activation, ctx.precision = activation, precision


def _backward(ctx, grad):
    a, c, idx, gu, gi, w_out, b_out, *rest = ctx.saved_tensors
    nw = ctx.num_layers
    weights, biases = rest[:nw], rest[nw:]
    outs = torch.ops.rankfast.mlp_score_backward(
        grad,
        a,
        c,
        idx,
        gu,
        gi,
        list(weights),
        list(biases),
        w_out,
        b_out,
        ctx.activation,
        ctx.precision,
    )
    da, dc, dgu, dgi, dwo, dbo = outs[:6]
    dws, dbs = outs[6 : 6 + nw], outs[6 + nw :]
    return (
        da,
        dc,
        None,
        None if gu is None else dgu,
        None if gi is None else dgi,
        list(dws),
        list(dbs),
        dwo,
        dbo,
        None,
        None,
    )


_mlp_score_op.register_autograd(_backward, setup_context=_setup_context)


def mlp_score(
    a,
    c,
    idx=None,
    *,
    gu=None,
    gi=None,
    weights=(),
    biases=(),
    w_out,
    b_out,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Fused scores ``[B, N]`` of ``act(a_u + c_i)`` through the rest of an MLP.

    Args:
        a: ``[B, H1]`` user terms of the first layer, its bias included.
        c: ``[M, H1]`` item terms of the first layer.
        idx: ``None`` (candidates are the rows of ``c``, N = M), ``[N]``
            shared candidate rows of ``c``, or ``[B, N]`` per-user rows.
        gu, gi: NeuMF's GMF vectors ``[B, G]`` (already multiplied by the
            output layer's GMF weights) and ``[M, G]``; score += <gu_b, gi_i>.
        weights, biases: the hidden layers after the first, ``nn.Linear``
            layout (``[out, in]``, ``[out]``); 0 to 3 of them. Every hidden
            layer is activated.
        w_out, b_out: the output layer, ``[H_last]`` and one element.
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``.
        precision: fp32 dots as ``"tf32"`` (tensor cores) or ``"ieee"``;
            ``None`` follows ``torch.get_float32_matmul_precision()``.
        check_ids: check that ``idx`` lies in ``[0, M)`` (an id out of range would read out
            of bounds). The check waits for the GPU (one device sync); a caller that has
            checked its ids already passes False, as the fused backend does.

    Differentiable with respect to every tensor but ``idx``.
    """
    if check_ids and idx is not None:
        check_index("idx", idx, c.shape[0])
    return torch.ops.rankfast.mlp_score(
        a,
        c,
        idx,
        gu,
        gi,
        list(weights),
        list(biases),
        w_out,
        b_out,
        activation,
        default_precision(precision),
    )


def _mlp_topk_impl(
    a,
    c,
    idx,
    gu,
    gi,
    weights,
    biases,
    w_out,
    b_out,
    excl,
    k,
    splits,
    activation,
    precision,
):
    act = _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)
    lay = _Layers(a, weights, biases, w_out, b_out, gu)
    a, c, idx_t, gu_t, gi_t, B, N, sib, sin, _ = _launch_args(a, c, idx, gu, gi)
    k, r, splits, chunk, keys = topk_mod.launch_plan(B, N, k, 16 if INTERPRET else 64, splits, excl, a.device)
    if B and N and k:
        excl_t = excl.contiguous() if excl is not None else idx_t
        _mlp_topk_kernel[(B * splits,)](
            a,
            c,
            idx_t,
            gu_t,
            gi_t,
            *lay.tensors(),
            lay.bo,
            excl_t,
            keys,
            B,
            N,
            *lay.h,
            lay.g,
            k,
            chunk,
            a.stride(0),
            c.stride(0),
            sib,
            sin,
            gu_t.stride(0),
            gi_t.stride(0),
            excl_t.stride(0) if excl is not None else 0,
            _n_key(N),
            HAS_EXCL=excl is not None,
            R=r,
            SPLITS=splits,
            **lay.meta(act, idx, gu, precision),
        )
    return topk_mod.decode_keys(keys, k, w_out.dtype)


@torch.library.custom_op("rankfast::mlp_score_topk", mutates_args=())
def _mlp_topk_op(
    a: torch.Tensor,
    c: torch.Tensor,
    idx: torch.Tensor | None,
    gu: torch.Tensor | None,
    gi: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    excl: torch.Tensor | None,
    k: int,
    splits: int,
    activation: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _mlp_topk_impl(
        a,
        c,
        idx,
        gu,
        gi,
        weights,
        biases,
        w_out,
        b_out,
        excl,
        k,
        splits,
        activation,
        precision,
    )


@_mlp_topk_op.register_fake
def _(
    a,
    c,
    idx,
    gu,
    gi,
    weights,
    biases,
    w_out,
    b_out,
    excl,
    k,
    splits,
    activation,
    precision,
):
    return a.new_empty(a.shape[0], k, dtype=torch.int64), a.new_empty(a.shape[0], k, dtype=w_out.dtype)


def mlp_score_topk(
    a,
    c,
    idx=None,
    *,
    k,
    exclude_mask=None,
    splits=0,
    gu=None,
    gi=None,
    weights=(),
    biases=(),
    w_out,
    b_out,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Each user's best ``k`` candidates ``(positions, values)``, ``[B, k]``,
    without the ``[B, N]`` scores: the rules of :func:`rankfast.topk`.

    ``exclude_mask``: int32 bitmask ``[B, ceil(N/32)]`` of excluded candidate
    positions (:func:`rankfast.kernels.topk.positions_bitmask`). ``splits``:
    programs per user (0: automatic). Other arguments as :func:`mlp_score`.
    Not differentiable.
    """
    topk_mod.check_k(k)
    if check_ids and idx is not None:
        check_index("idx", idx, c.shape[0])
    return torch.ops.rankfast.mlp_score_topk(
        a,
        c,
        idx,
        gu,
        gi,
        list(weights),
        list(biases),
        w_out,
        b_out,
        exclude_mask,
        int(k),
        int(splits),
        activation,
        default_precision(precision),
    )
