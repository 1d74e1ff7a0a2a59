"""Fused DCN-v2 scoring: a cross network and an MLP side by side, forward only.

DCN-v2's cross layers ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` multiply the request's
coordinates by the item's, so unlike an MLP's first layer they do not split into per-user
and per-item terms (docs/design.md): they run per pair, on chip. A tile is ``BLOCK_P``
(user, candidate) pairs, one row each (``mlp_score``'s tiles), one tile per program: unlike
``mlp_score``'s persistent programs, a loop over tiles here kept the ``[DP, DP]`` weight
tiles' addresses live across it and spilled registers on sm_90a. Per tile:

- ``x0 [BLOCK_P, DP]`` is gathered from two row tables: columns ``[0, DU)`` from the
  request row ``XU[u]`` (user and context fields), ``[DU, D)`` from the item row
  ``XI[item]`` (item fields); ``DP`` is ``D`` padded to a power of two, the padded columns
  read as zeros and stay zero (their weights and biases read as zeros);
- the ``L`` cross layers, each one ``tl.dot`` of ``x_l`` (fp32, cast to the weights' dtype)
  by ``W_l^T`` read in place (``nn.Linear`` layout), then ``x0 * (. + b_l) + x_l`` in fp32;
  the cross part of the score is ``<x_L, w_cross>``, so ``x0`` and ``x_L`` are dead before
- the deep network over ``x0``: its first layer split outside into ``a`` (per user, the
  request columns and the bias) and ``c`` (per item), the rest is ``mlp_score``'s
  ``_mlp_pairs`` (the same device code);
- the score, ``<x_L, w_cross> + <deep, w_deep> + b_out``, is the only store.

Scoring only: the op has no autograd (``rankfast.fit`` trains DCN-v2 eagerly) and refuses
tensors that require gradients. Public entry point: :func:`cross_score`
(``torch.ops.rankfast.cross_score``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfast.kernels import mlp_score as ms
from rankfast.kernels._common import (
    INTERPRET,
    cast,
    check_activation,
    check_device,
    check_dtype,
    check_index,
    check_index_layout,
    check_precision,
    configs,
    default_precision,
    dot,
    pad_width,
    weight_arg,
)

#: Widest ``x0`` (``D``, all fields' coordinates): a tile holds ``x0`` and ``x`` at full
#: width and a layer's whole ``[D, D]`` weight feeds one dot.
MAX_CROSS_WIDTH = 128
#: Most cross layers (the layer loop is unrolled) while ``x0`` pads to at most 64 columns, and
#: above that (:func:`max_cross_layers`): at a 128-wide tile, 3 and 4 layers spill 4 to 372 B a
#: thread on sm_90a in every autotune config, 2 none (bench/kernel_report.py).
MAX_CROSS_LAYERS = 4
MAX_WIDE_CROSS_LAYERS = 2


def max_cross_layers(width: int) -> int:
    """Most cross layers the kernel takes for ``x0`` of ``width`` coordinates."""
    return MAX_CROSS_LAYERS if pad_width(width) <= 64 else MAX_WIDE_CROSS_LAYERS


def _configs():
    """The autotune candidates: the ones that compile without spills and with wgmma dots for
    sm_90a at the benchmark shape (``bench/kernel_report.py``)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32, "BJ": 16, "TILE_U": 1}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 1}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BJ": 64, "TILE_U": 1}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BJ": 32, "TILE_U": 4}, num_warps=8, num_stages=2),
    ]
    return configs(out, out[0])


_KEY = ["N_KEY", "DP", "L", "H1P", "H2P", "H3P", "H4P", "NL", "ACT", "HAS_IDX"]


# --- device code ---------------------------------------------------------------------


@triton.jit
def _x0(XU, XI, u64, item, rmask, stride_xu, stride_xi, DU, D, DP: tl.constexpr):
    """``x0 [BLOCK_P, DP]`` in the rows' dtype: the request row's ``DU`` columns, then the item
    row's ``D - DU``, zeros past ``D`` (a select, not a sum: no rounding)."""
    d = tl.arange(0, DP)[None, :]
    in_user = d < DU
    xu = tl.load(XU + u64[:, None] * stride_xu + d, mask=rmask[:, None] & in_user, other=0.0)
    di = tl.where(in_user, 0, d - DU)
    xi = tl.load(XI + item[:, None] * stride_xi + di, mask=rmask[:, None] & ~in_user & (d < D), other=0.0)
    return tl.where(in_user, xu, xi)


@triton.jit
def _cross_pairs(x0, WC, BC, WX, D, L: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """``<x_L, w_cross>`` of the tile's pairs, ``[BLOCK_P]`` fp32: ``L`` cross layers on
    ``x0``, each ``W_l^T`` ``[DP, DP]`` read from its ``[D, D]`` weight ``WC[l]``."""
    k = tl.arange(0, DP)
    wmask = (k[:, None] < D) & (k[None, :] < D)
    x = x0.to(tl.float32)
    for layer in tl.static_range(L):
        w = tl.load(WC[layer] + k[None, :] * D + k[:, None], mask=wmask, other=0.0, eviction_policy="evict_last")
        z = dot(cast(x, w.dtype), w, PREC=PREC) + ms._vec(BC[layer], k, D)[None, :]
        x = x0.to(tl.float32) * z + x
    return tl.sum(x * ms._vec(WX, k, D)[None, :], axis=1)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.heuristics(ms._tile_heuristics())
@triton.jit
def _cross_fwd_kernel(
    XU,
    XI,
    IDX,
    WC,
    BC,
    WX,
    A,
    C,
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
    DU,
    D,
    H1,
    H2,
    H3,
    H4,
    stride_xu,
    stride_xi,
    stride_a,
    stride_c,
    stride_ib,
    stride_in,
    stride_ob,
    N_KEY,
    L: tl.constexpr,
    DP: tl.constexpr,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    ACT: tl.constexpr,
    HAS_IDX: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BJ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BJ1: tl.constexpr,
    BJ3: tl.constexpr,
    TILE_U: tl.constexpr,
):
    """Program ``pid`` scores tile ``pid`` (not persistent: a loop over tiles would keep the
    ``[DP, DP]`` weight tiles' addresses live across it, spilling registers)."""
    bo = tl.load(BO).to(tl.float32)
    u64, n, item, rmask = ms._tile(tl.program_id(0), B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
    x0 = _x0(XU, XI, u64, item, rmask, stride_xu, stride_xi, DU, D, DP)
    score = _cross_pairs(x0, WC, BC, WX, D, L, DP, PREC)
    if NL > 0:
        score += ms._mlp_pairs(
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
            BLOCK_P,
            ACT,
            PREC,
        )
    tl.store(OUT + u64 * stride_ob + n, cast(score + bo, OUT.dtype.element_ty), mask=rmask)


# --- host side -----------------------------------------------------------------------


def _check_inputs(
    xu, xi, idx, cross_weights, cross_biases, w_cross, a, c, weights, biases, w_deep, b_out, activation, precision
):
    """Shapes, dtypes and devices of the cross network, and of the deep one by ``mlp_score``'s
    checks; ``(activation id, the deep network's _Layers or None)``."""
    check_dtype("w_cross", w_cross)
    dtype, device = w_cross.dtype, xu.device
    if xu.dim() != 2 or xi.dim() != 2:
        raise ValueError(f"xu, xi: expected [B, Du] and [M, Di], got {tuple(xu.shape)} and {tuple(xi.shape)}")
    width = xu.shape[1] + xi.shape[1]
    if width > MAX_CROSS_WIDTH:
        raise ValueError(f"xu, xi: cross widths Du + Di up to {MAX_CROSS_WIDTH} are supported, got {width}")
    for name, t in (("xu", xu), ("xi", xi)):
        check_dtype(name, t, dtype)
        check_device(name, t, device)
    most = max_cross_layers(width)
    if not 1 <= len(cross_weights) <= most or len(cross_biases) != len(cross_weights):
        raise ValueError(
            f"cross_weights: expected 1..{most} cross layers with one bias each at width Du + Di = {width}, "
            f"got {len(cross_weights)} weights and {len(cross_biases)} biases"
        )
    for i, (w, b) in enumerate(zip(cross_weights, cross_biases, strict=True)):
        if w.shape != (width, width) or b.shape != (width,):
            raise ValueError(
                f"cross_weights[{i}]: expected [{width}, {width}] with bias [{width}] (Du + Di = {width}), "
                f"got {tuple(w.shape)}, {tuple(b.shape)}"
            )
        check_device(f"cross_weights[{i}]", w, device)
        check_dtype(f"cross_weights[{i}]", w, dtype)
        check_dtype(f"cross_biases[{i}]", b, dtype)
    if w_cross.shape != (width,):
        raise ValueError(f"w_cross: expected [{width}] (the output layer's cross weights), got {tuple(w_cross.shape)}")
    if b_out.numel() != 1:
        raise ValueError(f"b_out: expected one element, got shape {tuple(b_out.shape)}")
    check_index_layout(idx, xu.shape[0], device)
    if (a is None) != (c is None) or (a is None) != (w_deep is None):
        raise ValueError("a, c, w_deep: give the deep network's split terms and output weights, or none of them")
    if a is None:
        if weights or biases:
            raise ValueError("weights, biases: a deep network needs its split first layer (a, c)")
        check_precision(precision)
        return check_activation(activation), None
    if a.shape[0] != xu.shape[0] or c.shape[0] != xi.shape[0]:
        raise ValueError(
            f"a, c: expected a row per request row ({xu.shape[0]}) and per item row ({xi.shape[0]}), "
            f"got {tuple(a.shape)} and {tuple(c.shape)}"
        )
    check_dtype("w_deep", w_deep, dtype)
    act = ms._check_inputs(a, c, idx, None, None, weights, biases, w_deep, b_out, activation, precision)
    return act, ms._Layers(a, weights, biases, w_deep, b_out, None)


def _cross_forward_impl(
    xu, xi, idx, cross_weights, cross_biases, w_cross, a, c, weights, biases, w_deep, b_out, activation, precision
):
    act, lay = _check_inputs(
        xu, xi, idx, cross_weights, cross_biases, w_cross, a, c, weights, biases, w_deep, b_out, activation, precision
    )
    xu, xi, idx_t, _, _, B, N, sib, sin, _ = ms._launch_args(xu, xi, idx, None, None)
    out = torch.empty(B, N, dtype=w_cross.dtype, device=xu.device)
    if B == 0 or N == 0:
        return out
    if lay is None:  # no deep network: placeholders the kernel never reads
        a = c = xu
        deep_tensors, widths, meta = [xu] * 7, [1] * 4, dict(NL=0, H1P=16, H2P=16, H3P=16, H4P=16)
        bo = weight_arg(b_out).reshape(1)
    else:
        a, c = a.contiguous(), c.contiguous()
        deep_tensors, widths, bo = lay.tensors(), lay.h, lay.bo
        meta = dict(NL=lay.nl, **dict(zip(("H1P", "H2P", "H3P", "H4P"), lay.pads, strict=True)))
    width = xu.shape[1] + xi.shape[1]

    def grid(m):
        return (triton.cdiv(B, m["BLOCK_U"]) * triton.cdiv(N, m["BLOCK_N"]),)

    _cross_fwd_kernel[grid](
        xu,
        xi,
        idx_t,
        tuple(weight_arg(w) for w in cross_weights),
        tuple(weight_arg(b) for b in cross_biases),
        weight_arg(w_cross),
        a,
        c,
        *deep_tensors,
        bo,
        out,
        B,
        N,
        xu.shape[1],
        width,
        *widths,
        xu.stride(0),
        xi.stride(0),
        a.stride(0),
        c.stride(0),
        sib,
        sin,
        out.stride(0),
        ms._n_key(N),
        L=len(cross_weights),
        DP=pad_width(width),
        ACT=act,
        HAS_IDX=idx is not None,
        PREC=precision,
        **meta,
    )
    return out


# --- PyTorch operator ------------------------------------------------------------------


@torch.library.custom_op("rankfast::cross_score", mutates_args=())
def _cross_score_op(
    xu: torch.Tensor,
    xi: torch.Tensor,
    idx: torch.Tensor | None,
    cross_weights: list[torch.Tensor],
    cross_biases: list[torch.Tensor],
    w_cross: torch.Tensor,
    a: torch.Tensor | None,
    c: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_deep: torch.Tensor | None,
    b_out: torch.Tensor,
    activation: str,
    precision: str,
) -> torch.Tensor:
    return _cross_forward_impl(
        xu, xi, idx, cross_weights, cross_biases, w_cross, a, c, weights, biases, w_deep, b_out, activation, precision
    )


@_cross_score_op.register_fake
def _(xu, xi, idx, cross_weights, cross_biases, w_cross, a, c, weights, biases, w_deep, b_out, activation, precision):
    n = xi.shape[0] if idx is None else idx.shape[-1]
    return xu.new_empty(xu.shape[0], n, dtype=w_cross.dtype)


def cross_score(
    xu,
    xi,
    idx=None,
    *,
    cross_weights,
    cross_biases,
    w_cross,
    a=None,
    c=None,
    weights=(),
    biases=(),
    w_deep=None,
    b_out,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Fused DCN-v2 scores ``[B, N]``: ``<x_L, w_cross> + <deep(x0), w_deep> + b_out`` with
    ``x0 = [xu_b; xi_i]`` and ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``.

    Args:
        xu: ``[B, Du]`` request rows (the user's and the context's field vectors, flattened).
        xi: ``[M, Di]`` item rows (the item's field vectors, flattened); ``Du + Di`` up to
            :data:`MAX_CROSS_WIDTH`.
        idx: ``None`` (candidates are the rows of ``xi``), ``[N]`` shared or ``[B, N]``
            per-user rows of ``xi`` (and of ``c``).
        cross_weights, cross_biases: the cross layers, ``nn.Linear`` layout ``[D, D]``, ``[D]``
            (1 to :func:`max_cross_layers` of ``D``: 4 up to 64 coordinates, 2 above).
        w_cross: ``[D]``, the output layer's weights over ``x_L``.
        a, c: the deep network's first layer split as in :func:`~rankfast.kernels.mlp_score.mlp_score`
            (``[B, H1]`` with its bias, ``[M, H1]``); None without a deep network.
        weights, biases: the deep network's hidden layers after the first (0 to 3); every
            hidden layer is activated.
        w_deep: ``[H_last]``, the output layer's weights over the deep network (None without one).
        b_out: the output bias, one element.
        activation, precision, check_ids: as :func:`~rankfast.kernels.mlp_score.mlp_score`.

    Not differentiable (scoring only): tensors that require gradients are refused while
    autograd records, rather than silently getting none.
    """
    tensors = [xu, xi, w_cross, a, c, w_deep, b_out, *cross_weights, *cross_biases, *weights, *biases]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "cross_score: the DCN-v2 kernel is inference-only (no backward); "
            "call it under torch.no_grad() or torch.inference_mode()"
        )
    if check_ids and idx is not None:
        check_index("idx", idx, xi.shape[0])
    return torch.ops.rankfast.cross_score(
        xu,
        xi,
        idx,
        list(cross_weights),
        list(cross_biases),
        w_cross,
        a,
        c,
        list(weights),
        list(biases),
        w_deep,
        b_out,
        activation,
        default_precision(precision),
    )
