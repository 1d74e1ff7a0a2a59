"""Fused MLP scoring (MLPModel, NeuMF): forward, backward and score + top-K.

The first layer is split (docs/design.md): ``A = E_u W1u^T + b1`` per user
``[B, H1]`` and ``C = E_i W1i^T`` per item ``[M, H1]`` are computed outside
(small). A program takes a tile of ``BLOCK_U`` users x ``BLOCK_N`` candidates
(``BLOCK_P`` pairs) and, in registers, forms ``act(A_u + C_i)`` in chunks of
``BJ`` units, feeding each chunk straight into the next layer's ``tl.dot``;
later layers follow (up to 3 after the first, widths up to 512), then the
output layer, NeuMF's GMF term (a per-pair dot of ``g_u * w_gmf`` and
``g_i``) and the score write. No per-pair tensor ever reaches global memory.

Layer chunking: with hidden widths ``H1..H4`` only ``h2`` (and ``h4``) are
held at full width; ``h1`` and ``h3`` exist one ``BJ`` chunk at a time, each
chunk multiplied into the next layer's accumulator (the flash-MLP pattern),
so weights are read in ``[BJ, H]`` slices.

Backward recomputes the pair activations tile by tile (nothing per pair is
stored) and accumulates gradients with fp32 atomics: weights and biases per
tile, ``A`` rows summed over the tile's candidates, ``C`` rows summed over the
tile's users (shared candidates) or per pair (per-user candidates).

Public entry points (registered as ``torch.ops.rankfast.*``):

* :func:`mlp_score` - the op on precomputed ``A``, ``C`` and raw layer weights (differentiable);
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
from rankfast.kernels.topk import excluded, merge, store_keys, tile_keys

MAX_LAYERS = 4  # hidden layers in all: the split first one plus up to 3


def _configs(backward: bool):
    """``TILE_U``: the fewest users a tile spans (see ``_tile_heuristics``)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32, "BJ": 16, "TILE_U": 1}, num_warps=4, num_stages=1)]
    if backward:
        # Several users per tile sum their item-row gradients in registers before the
        # atomics (shared candidates), at the cost of more user-row atomics: timed, not assumed.
        out = [
            triton.Config({"BLOCK_P": 64, "BJ": 32, "TILE_U": 1}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_P": 128, "BJ": 32, "TILE_U": 1}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_P": 64, "BJ": 32, "TILE_U": 4}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_P": 128, "BJ": 32, "TILE_U": 8}, num_warps=8, num_stages=2),
        ]
    else:  # a few candidates: every one is compiled and timed per new shape
        out = [
            triton.Config({"BLOCK_P": 64, "BJ": 32, "TILE_U": 1}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_P": 64, "BJ": 64, "TILE_U": 1}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_P": 128, "BJ": 32, "TILE_U": 1}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 1}, num_warps=8, num_stages=3),
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
def _tile(pid, B, N, IDX, stride_ib, stride_in, BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IDX: tl.constexpr):
    """Pair rows of tile ``pid``: user, candidate position, item row, mask (all ``[BLOCK_P]``)."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_u = pid // num_n
    pid_n = pid % num_n
    p = tl.arange(0, BLOCK_U * BLOCK_N)
    u = pid_u * BLOCK_U + p // BLOCK_N
    n = pid_n * BLOCK_N + p % BLOCK_N
    rmask = (u < B) & (n < N)
    u64 = u.to(tl.int64)
    item = item_rows(IDX, u64, n, rmask, stride_ib, stride_in, HAS_IDX)
    return pid_u, pid_n, u64, n, item, rmask


@triton.jit
def _z1(a_row, c_row, rmask, cj, H1, pooled, WP, H1P: tl.constexpr, HAS_POOL: tl.constexpr, PREC: tl.constexpr):
    """First-layer pre-activations of the tile's pairs for units ``cj``: ``A_u + C_i`` in fp32
    (plus, for target attention, the pooled history's term ``pooled @ WP[:, cj]``)."""
    m = rmask[:, None] & (cj[None, :] < H1)
    a = tl.load(a_row[:, None] + cj[None, :], mask=m, other=0.0).to(tl.float32)
    c = tl.load(c_row[:, None] + cj[None, :], mask=m, other=0.0).to(tl.float32)
    z = a + c
    if HAS_POOL:
        dd = tl.arange(0, pooled.shape[1])
        wp = tl.load(WP + dd[:, None] * H1P + cj[None, :])
        z = dot(cast(pooled, wp.dtype), wp, z, PREC=PREC)
    return z


@triton.jit
def _h2(
    a_row,
    c_row,
    rmask,
    H1,
    pooled,
    WP,
    HAS_POOL: tl.constexpr,
    W2,
    B2,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    BJ1: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Second hidden layer at full width: ``(z2, act(z2))``, ``[BLOCK_P, H2P]`` fp32."""
    c2 = tl.arange(0, H2P)
    acc = tl.zeros([BLOCK_P, H2P], dtype=tl.float32)
    for j in range(0, H1P, BJ1):
        cj = j + tl.arange(0, BJ1)
        a1 = act_fn(_z1(a_row, c_row, rmask, cj, H1, pooled, WP, H1P, HAS_POOL, PREC), ACT)
        w = tl.load(W2 + cj[:, None] * H2P + c2[None, :])
        acc = dot(cast(a1, w.dtype), w, acc, PREC=PREC)
    z2 = acc + tl.load(B2 + c2)[None, :]
    return z2, act_fn(z2, ACT)


@triton.jit
def _mlp_pairs(
    a_row,
    c_row,
    rmask,
    H1,
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
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The MLP on the tile's pairs, without the output bias: ``[BLOCK_P]`` fp32."""
    score = tl.zeros([BLOCK_P], dtype=tl.float32)
    if NL == 1:
        for j in range(0, H1P, BJ1):
            cj = j + tl.arange(0, BJ1)
            a1 = act_fn(_z1(a_row, c_row, rmask, cj, H1, pooled, WP, H1P, HAS_POOL, PREC), ACT)
            score += tl.sum(a1 * tl.load(WO + cj)[None, :], axis=1)
    else:
        z2, h2 = _h2(a_row, c_row, rmask, H1, pooled, WP, HAS_POOL, W2, B2, H1P, H2P, BJ1, BLOCK_P, ACT, PREC)
        c2 = tl.arange(0, H2P)
        if NL == 2:
            score = tl.sum(h2 * tl.load(WO + c2)[None, :], axis=1)
        else:
            h2c = cast(h2, W3.dtype.element_ty)
            c4 = tl.arange(0, H4P)
            acc4 = tl.zeros([BLOCK_P, H4P], dtype=tl.float32)
            for j in range(0, H3P, BJ3):
                cj = j + tl.arange(0, BJ3)
                w3 = tl.load(W3 + c2[:, None] * H3P + cj[None, :])
                a3 = act_fn(dot(h2c, w3, PREC=PREC) + tl.load(B3 + cj)[None, :], ACT)
                if NL == 3:
                    score += tl.sum(a3 * tl.load(WO + cj)[None, :], axis=1)
                else:
                    w4 = tl.load(W4 + cj[:, None] * H4P + c4[None, :])
                    acc4 = dot(cast(a3, w4.dtype), w4, acc4, PREC=PREC)
            if NL == 4:
                h4 = act_fn(acc4 + tl.load(B4 + c4)[None, :], ACT)
                score = tl.sum(h4 * tl.load(WO + c4)[None, :], axis=1)
    return score


@triton.jit
def _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP: tl.constexpr):
    cg = tl.arange(0, GP)
    m = rmask[:, None] & (cg[None, :] < G)
    gu = tl.load(GU + u64[:, None] * stride_gu + cg[None, :], mask=m, other=0.0).to(tl.float32)
    gi = tl.load(GI + item[:, None] * stride_gi + cg[None, :], mask=m, other=0.0).to(tl.float32)
    return gu, gi


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
    pid = tl.program_id(0)
    _, _, u64, n, item, rmask = _tile(pid, B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
    score = _mlp_pairs(
        A + u64 * stride_a,
        C + item * stride_c,
        rmask,
        H1,
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
        H1P,
        H2P,
        H3P,
        H4P,
        BJ1,
        BJ3,
        BLOCK_P,
        ACT,
        PREC,
    )
    if HAS_GMF:
        gu, gi = _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP)
        score += tl.sum(gu * gi, axis=1)
    score += tl.load(BO).to(tl.float32)
    tl.store(OUT + u64 * stride_ob + n, cast(score, OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _scatter_rows(
    DST,
    stride,
    rmask,
    item,
    pid_u,
    pid_n,
    B,
    N,
    IDX,
    stride_ib,
    stride_in,
    vals,
    cols,
    ncols,
    BLOCK_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr,
    SHARED: tl.constexpr,
    PER_USER: tl.constexpr,
):
    """Atomically adds per-pair rows ``vals [BLOCK_P, W]`` into ``DST``: summed over the
    tile's candidates into user rows (``PER_USER``), else into item rows, summed
    over the tile's users when every user has the same candidates (``SHARED``)."""
    if PER_USER:
        v = tl.sum(tl.reshape(vals, (BLOCK_U, BLOCK_N, vals.shape[1])), axis=1)
        uu = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
        m = (uu < B)[:, None] & (cols[None, :] < ncols)
        tl.atomic_add(DST + uu.to(tl.int64)[:, None] * stride + cols[None, :], v, mask=m)
    elif SHARED:
        v = tl.sum(tl.reshape(vals, (BLOCK_U, BLOCK_N, vals.shape[1])), axis=0)
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = nn < N
        it = item_rows(IDX, 0, nn, nm, stride_ib, stride_in, HAS_IDX)  # shared: stride_ib is 0
        m = nm[:, None] & (cols[None, :] < ncols)
        tl.atomic_add(DST + it[:, None] * stride + cols[None, :], v, mask=m)
    else:
        m = rmask[:, None] & (cols[None, :] < ncols)
        tl.atomic_add(DST + item[:, None] * stride + cols[None, :], vals, mask=m)


@triton.jit
def _tail_bwd(
    a_row,
    c_row,
    rmask,
    item,
    go,
    H1,
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
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
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
    """Backward of the MLP on the tile's pairs given ``go = d score [BLOCK_P]``: atomically adds the
    gradients of every layer after the first, of ``A`` rows (users) and ``C`` rows (items), and with
    ``HAS_POOL`` of the pooled block ``WP``; returns ``d pooled [BLOCK_P, DP]`` (zeros without it)."""
    dd = tl.arange(0, DP)
    dpooled = tl.zeros([BLOCK_P, DP], dtype=tl.float32)
    c2 = tl.arange(0, H2P)
    if NL >= 2:
        z2, h2 = _h2(a_row, c_row, rmask, H1, pooled, WP, HAS_POOL, W2, B2, H1P, H2P, BJ1, BLOCK_P, ACT, PREC)
        if NL == 2:
            wo = tl.load(WO + c2)
            tl.atomic_add(DWO + c2, tl.sum(h2 * go[:, None], axis=0))
            dz2 = go[:, None] * wo[None, :] * act_grad(z2, ACT)
        else:
            h2c = cast(h2, W3.dtype.element_ty)
            c4 = tl.arange(0, H4P)
            if NL == 4:
                # Recompute h4, then its gradient.
                acc4 = tl.zeros([BLOCK_P, H4P], dtype=tl.float32)
                for j in range(0, H3P, BJ3):
                    cj = j + tl.arange(0, BJ3)
                    w3 = tl.load(W3 + c2[:, None] * H3P + cj[None, :])
                    a3 = act_fn(dot(h2c, w3, PREC=PREC) + tl.load(B3 + cj)[None, :], ACT)
                    w4 = tl.load(W4 + cj[:, None] * H4P + c4[None, :])
                    acc4 = dot(cast(a3, w4.dtype), w4, acc4, PREC=PREC)
                z4 = acc4 + tl.load(B4 + c4)[None, :]
                h4 = act_fn(z4, ACT)
                tl.atomic_add(DWO + c4, tl.sum(h4 * go[:, None], axis=0))
                dz4 = go[:, None] * tl.load(WO + c4)[None, :] * act_grad(z4, ACT)
                tl.atomic_add(DB4 + c4, tl.sum(dz4, axis=0))
                dz4c = cast(dz4, W4.dtype.element_ty)
            dh2 = tl.zeros([BLOCK_P, H2P], dtype=tl.float32)
            for j in range(0, H3P, BJ3):
                cj = j + tl.arange(0, BJ3)
                w3 = tl.load(W3 + c2[:, None] * H3P + cj[None, :])
                z3 = dot(h2c, w3, PREC=PREC) + tl.load(B3 + cj)[None, :]
                a3 = act_fn(z3, ACT)
                if NL == 3:
                    tl.atomic_add(DWO + cj, tl.sum(a3 * go[:, None], axis=0))
                    da3 = go[:, None] * tl.load(WO + cj)[None, :]
                else:
                    w4 = tl.load(W4 + cj[:, None] * H4P + c4[None, :])
                    dw4 = dot(tl.trans(cast(a3, w4.dtype)), dz4c, PREC=PREC)
                    tl.atomic_add(DW4 + cj[:, None] * H4P + c4[None, :], dw4)
                    da3 = dot(dz4c, tl.trans(w4), PREC=PREC)
                dz3 = da3 * act_grad(z3, ACT)
                tl.atomic_add(DB3 + cj, tl.sum(dz3, axis=0))
                dz3c = cast(dz3, w3.dtype)
                tl.atomic_add(DW3 + c2[:, None] * H3P + cj[None, :], dot(tl.trans(h2c), dz3c, PREC=PREC))
                dh2 = dot(dz3c, tl.trans(w3), dh2, PREC=PREC)
            dz2 = dh2 * act_grad(z2, ACT)
        tl.atomic_add(DB2 + c2, tl.sum(dz2, axis=0))
        dz2c = cast(dz2, W2.dtype.element_ty)

    for j in range(0, H1P, BJ1):
        cj = j + tl.arange(0, BJ1)
        z1 = _z1(a_row, c_row, rmask, cj, H1, pooled, WP, H1P, HAS_POOL, PREC)
        a1 = act_fn(z1, ACT)
        if NL == 1:
            tl.atomic_add(DWO + cj, tl.sum(a1 * go[:, None], axis=0))
            da1 = go[:, None] * tl.load(WO + cj)[None, :]
        else:
            w2 = tl.load(W2 + cj[:, None] * H2P + c2[None, :])
            tl.atomic_add(DW2 + cj[:, None] * H2P + c2[None, :], dot(tl.trans(cast(a1, w2.dtype)), dz2c, PREC=PREC))
            da1 = dot(dz2c, tl.trans(w2), PREC=PREC)
        dz1 = da1 * act_grad(z1, ACT)
        if HAS_POOL:
            wp = tl.load(WP + dd[:, None] * H1P + cj[None, :])
            dz1c = cast(dz1, wp.dtype)
            tl.atomic_add(DWP + dd[:, None] * H1P + cj[None, :], dot(tl.trans(cast(pooled, wp.dtype)), dz1c, PREC=PREC))
            dpooled = dot(dz1c, tl.trans(wp), dpooled, PREC=PREC)
        _scatter_rows(
            DA,
            H1,
            rmask,
            item,
            pid_u,
            pid_n,
            B,
            N,
            IDX,
            stride_ib,
            stride_in,
            dz1,
            cj,
            H1,
            BLOCK_U,
            BLOCK_N,
            HAS_IDX,
            SHARED,
            True,
        )
        _scatter_rows(
            DC,
            H1,
            rmask,
            item,
            pid_u,
            pid_n,
            B,
            N,
            IDX,
            stride_ib,
            stride_in,
            dz1,
            cj,
            H1,
            BLOCK_U,
            BLOCK_N,
            HAS_IDX,
            SHARED,
            False,
        )
    return dpooled


@triton.autotune(
    configs=_configs(True),
    key=_KEY + ["SHARED"],
    reset_to_zero=["DA", "DC", "DGU", "DGI", "DW2", "DB2", "DW3", "DB3", "DW4", "DB4", "DWO", "DBO"],
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
    G,
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
    HLP: tl.constexpr,
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
    """Persistent: program ``pid`` takes tiles pid, pid + G, ... and adds its weight and bias
    gradients into its own slot of ``DW*``/``DB*``/``DWO``/``DBO`` (``[programs, ...]``, summed on
    the host), so those atomics never contend across programs; ``A``/``C``/GMF row gradients
    go straight to their rows."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(B, BLOCK_U) * tl.cdiv(N, BLOCK_N)
    slot = pid.to(tl.int64)
    DW2 += slot * (H1P * H2P)
    DB2 += slot * H2P
    DW3 += slot * (H2P * H3P)
    DB3 += slot * H3P
    DW4 += slot * (H3P * H4P)
    DB4 += slot * H4P
    DWO += slot * HLP
    DBO += slot
    for tile in range(pid, num_tiles, num_programs):
        pid_u, pid_n, u64, n, item, rmask = _tile(tile, B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
        a_row = A + u64 * stride_a
        c_row = C + item * stride_c
        go = tl.load(GOUT + u64 * stride_go + n, mask=rmask, other=0.0).to(tl.float32)  # [P]
        tl.atomic_add(DBO, tl.sum(go, axis=0))

        if HAS_GMF:
            cg = tl.arange(0, GP)
            gu, gi = _gmf(GU, GI, u64, item, rmask, stride_gu, stride_gi, G, GP)
            _scatter_rows(
                DGU,
                G,
                rmask,
                item,
                pid_u,
                pid_n,
                B,
                N,
                IDX,
                stride_ib,
                stride_in,
                go[:, None] * gi,
                cg,
                G,
                BLOCK_U,
                BLOCK_N,
                HAS_IDX,
                SHARED,
                True,
            )
            _scatter_rows(
                DGI,
                G,
                rmask,
                item,
                pid_u,
                pid_n,
                B,
                N,
                IDX,
                stride_ib,
                stride_in,
                go[:, None] * gu,
                cg,
                G,
                BLOCK_U,
                BLOCK_N,
                HAS_IDX,
                SHARED,
                False,
            )

        _tail_bwd(
            a_row,
            c_row,
            rmask,
            item,
            go,
            H1,
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
            H1P,
            H2P,
            H3P,
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


def backward_programs(num_tiles: int, device: torch.device) -> int:
    """Programs of the persistent MLP backward: 2 per SM on a GPU (each holds a private slot of
    weight gradients, ~0.13 MB for the 256-128 reference MLP), 3 under the interpreter (so the
    tests cover programs that take several tiles)."""
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 3
    return max(1, min(num_tiles, cap))


def _topk_configs():
    if INTERPRET:
        return [triton.Config({"BJ": 16}, num_warps=4, num_stages=1)]
    out = [triton.Config({"BJ": 32}, num_warps=4, num_stages=2), triton.Config({"BJ": 64}, num_warps=8, num_stages=2)]
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
        score = _mlp_pairs(
            A + u64 * stride_a,
            C + item * stride_c,
            nmask,
            H1,
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
        if HAS_GMF:
            gu, gi = _gmf(GU, GI, u64, item, nmask, stride_gu, stride_gi, G, GP)
            score += tl.sum(gu * gi, axis=1)
        score = cast(score + bo, W2.dtype.element_ty).to(tl.float32)  # ranked as the unfused scores are
        eligible = nmask & (~excluded(EXCL, b64, stride_e, n, nmask, HAS_EXCL))
        running = merge(running, tile_keys(score, n, eligible))
    store_keys(running, OUT_KEYS, pid, K, R)


# --- host side -----------------------------------------------------------------------


class _Prepared:
    """Padded, transposed weights and launch constants for one call."""

    def __init__(self, a, c, weights, biases, w_out, gu, dtype):
        nl = len(weights) + 1
        widths = [a.shape[1]] + [w.shape[0] for w in weights]
        self.nl = nl
        self.widths = widths
        pads = [pad_width(w) for w in widths] + [16] * (MAX_LAYERS - nl)
        self.h1p, self.h2p, self.h3p, self.h4p = pads
        wts = []
        for i, w in enumerate(weights):
            wts.append(padded_t(w, pads[i], pads[i + 1], dtype))
        bs = [padded_vec(b, pads[i + 1], like=a) for i, b in enumerate(biases)]
        dummy = a.new_zeros(16, dtype=torch.float32)
        dummy_w = a.new_zeros(16, dtype=dtype)
        self.w = wts + [dummy_w] * (MAX_LAYERS - 1 - len(wts))
        self.b = bs + [dummy] * (MAX_LAYERS - 1 - len(bs))
        self.wo = padded_vec(w_out, pads[nl - 1], like=a)
        self.g = 0 if gu is None else gu.shape[1]
        self.gp = pad_width(max(1, self.g))


def _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
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
        width = w.shape[0]
    widths = [a.shape[1]] + [w.shape[0] for w in weights]
    if max(widths) > MAX_WIDTH:
        raise ValueError(f"weights: layer widths up to {MAX_WIDTH} are supported, got {widths}")
    if w_out.shape != (width,):
        raise ValueError(f"w_out: expected [{width}] (the output layer's weights), got {tuple(w_out.shape)}")
    if b_out.numel() != 1:
        raise ValueError(f"b_out: expected one element, got shape {tuple(b_out.shape)}")
    if idx is not None:
        if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[0] != a.shape[0]):
            raise ValueError(f"idx: expected [N] or [B={a.shape[0]}, N], got {tuple(idx.shape)}")
        check_device("idx", idx, device)
        check_index("idx", idx, c.shape[0])
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
        idx_t = a.new_zeros(1, dtype=torch.int32)
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
    prep = _Prepared(a, c, weights, biases, w_out, gu, w_out.dtype)
    a, c, idx_t, gu_t, gi_t, B, N, sib, sin, _ = _launch_args(a, c, idx, gu, gi)
    out = torch.empty(B, N, dtype=w_out.dtype, device=a.device)
    if B == 0 or N == 0:
        return out
    bo = b_out.detach().reshape(1).float()

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_U"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _mlp_fwd_kernel[grid](
        a,
        c,
        idx_t,
        gu_t,
        gi_t,
        prep.w[0],
        prep.b[0],
        prep.w[1],
        prep.b[1],
        prep.w[2],
        prep.b[2],
        prep.wo,
        bo,
        out,
        B,
        N,
        a.shape[1],
        prep.g,
        a.stride(0),
        c.stride(0),
        sib,
        sin,
        gu_t.stride(0),
        gi_t.stride(0),
        out.stride(0),
        _n_key(N),
        NL=prep.nl,
        H1P=prep.h1p,
        H2P=prep.h2p,
        H3P=prep.h3p,
        H4P=prep.h4p,
        GP=prep.gp,
        ACT=act,
        HAS_IDX=idx is not None,
        HAS_GMF=gu is not None,
        PREC=precision,
    )
    return out


def _mlp_backward_impl(grad, a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision):
    act = _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)
    prep = _Prepared(a, c, weights, biases, w_out, gu, w_out.dtype)
    a_c, c_c, idx_t, gu_t, gi_t, B, N, sib, sin, shared = _launch_args(a, c, idx, gu, gi)
    f32 = dict(dtype=torch.float32, device=a.device)
    da = torch.zeros(a.shape, **f32)
    dc = torch.zeros(c.shape, **f32)
    g = max(1, prep.g)
    dgu = torch.zeros(a.shape[0] if gu is not None else 1, g, **f32)
    dgi = torch.zeros(c.shape[0] if gi is not None else 1, g, **f32)
    pads = [prep.h1p, prep.h2p, prep.h3p, prep.h4p]
    hlp = pads[prep.nl - 1]
    grad = grad.contiguous()
    # Upper bound on the programs (tiles with the smallest config); the launch uses the first `programs` slots.
    slots = backward_programs(triton.cdiv(B, 1) * triton.cdiv(N, 16) if B and N else 1, a.device)
    dws = [torch.zeros(slots, pads[i], pads[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    dbs = [torch.zeros(slots, pads[i + 1], **f32) for i in range(MAX_LAYERS - 1)]
    dwo = torch.zeros(slots, hlp, **f32)
    dbo = torch.zeros(slots, **f32)
    if B and N:

        def grid(meta):
            return (backward_programs(triton.cdiv(B, meta["BLOCK_U"]) * triton.cdiv(N, meta["BLOCK_N"]), a.device),)

        _mlp_bwd_kernel[grid](
            a_c,
            c_c,
            idx_t,
            gu_t,
            gi_t,
            prep.w[0],
            prep.b[0],
            prep.w[1],
            prep.b[1],
            prep.w[2],
            prep.b[2],
            prep.wo,
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
            a.shape[1],
            prep.g,
            a_c.stride(0),
            c_c.stride(0),
            sib,
            sin,
            gu_t.stride(0),
            gi_t.stride(0),
            grad.stride(0),
            _n_key(N),
            NL=prep.nl,
            H1P=prep.h1p,
            H2P=prep.h2p,
            H3P=prep.h3p,
            H4P=prep.h4p,
            GP=prep.gp,
            HLP=hlp,
            ACT=act,
            HAS_IDX=idx is not None,
            HAS_GMF=gu is not None,
            SHARED=shared,
            PREC=precision,
        )
    dws = [d.sum(0) for d in dws]
    dbs = [d.sum(0) for d in dbs]
    dwo, dbo = dwo.sum(0), dbo.sum(0, keepdim=True)
    widths = prep.widths
    d_weights = [
        dws[i][: widths[i], : widths[i + 1]].t().contiguous().to(weights[i].dtype) for i in range(len(weights))
    ]
    d_biases = [dbs[i][: widths[i + 1]].to(biases[i].dtype) for i in range(len(biases))]
    d_gu = None if gu is None else dgu.to(gu.dtype)
    d_gi = None if gi is None else dgi.to(gi.dtype)
    return (
        da.to(a.dtype),
        dc.to(c.dtype),
        d_gu,
        d_gi,
        d_weights,
        d_biases,
        dwo[: widths[-1]].to(w_out.dtype),
        dbo.reshape(b_out.shape).to(b_out.dtype),
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
        grad, a, c, idx, gu, gi, list(weights), list(biases), w_out, b_out, ctx.activation, ctx.precision
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
    a, c, idx=None, *, gu=None, gi=None, weights=(), biases=(), w_out, b_out, activation="relu", precision=None
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

    Differentiable with respect to every tensor but ``idx``.
    """
    return torch.ops.rankfast.mlp_score(
        a, c, idx, gu, gi, list(weights), list(biases), w_out, b_out, activation, default_precision(precision)
    )


def _mlp_topk_impl(a, c, idx, gu, gi, weights, biases, w_out, b_out, excl, k, splits, activation, precision):
    act = _check_inputs(a, c, idx, gu, gi, weights, biases, w_out, b_out, activation, precision)
    prep = _Prepared(a, c, weights, biases, w_out, gu, w_out.dtype)
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
            prep.w[0],
            prep.b[0],
            prep.w[1],
            prep.b[1],
            prep.w[2],
            prep.b[2],
            prep.wo,
            b_out.detach().reshape(1).float(),
            excl_t,
            keys,
            B,
            N,
            a.shape[1],
            prep.g,
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
            NL=prep.nl,
            H1P=prep.h1p,
            H2P=prep.h2p,
            H3P=prep.h3p,
            H4P=prep.h4p,
            GP=prep.gp,
            ACT=act,
            HAS_IDX=idx is not None,
            HAS_GMF=gu is not None,
            HAS_EXCL=excl is not None,
            PREC=precision,
            R=r,
            SPLITS=splits,
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
    return _mlp_topk_impl(a, c, idx, gu, gi, weights, biases, w_out, b_out, excl, k, splits, activation, precision)


@_mlp_topk_op.register_fake
def _(a, c, idx, gu, gi, weights, biases, w_out, b_out, excl, k, splits, activation, precision):
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
):
    """Each user's best ``k`` candidates ``(positions, values)``, ``[B, k]``,
    without the ``[B, N]`` scores: the rules of :func:`rankfast.topk`.

    ``exclude_mask``: int32 bitmask ``[B, ceil(N/32)]`` of excluded candidate
    positions (:func:`rankfast.kernels.topk.positions_bitmask`). ``splits``:
    programs per user (0: automatic). Other arguments as :func:`mlp_score`.
    Not differentiable.
    """
    topk_mod.check_k(k)
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
