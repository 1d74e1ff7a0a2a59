"""Fused expected-rating scoring (RecommenderNet): an MLP with a class head, forward only.

RecommenderNet's MLP over ``[E_u; E_i]`` ends in one unit per rating class and scores the
expected rating ``softmax(logits) @ class_values``. Its hidden layers are ``mlp_score``'s:
the first layer split outside into ``a`` (per user, with the bias) and ``c`` (per item),
the later ones on chip, in ``mlp_score``'s persistent tiles of ``BLOCK_P`` (user, candidate)
pairs, through the same device code (``_tile``, ``_mlp_pairs``). Only the output layer
differs, and ``_mlp_pairs`` has it as a compile-time branch (its ``CP``): the last hidden
activations times the class weights ``[C, H]``, read in place and padded to ``CP`` columns
(a power of two, at least 16) with masks, one ``tl.dot`` per hidden chunk, giving the
logits ``[BLOCK_P, CP]`` in fp32. Here the class biases are added (``-inf`` past ``C``, so
the padded classes get probability 0), the softmax is taken over the real classes in fp32
and dotted with the class values; the expected rating is the only store.

Scoring only: the op has no autograd (``rankfast.fit`` trains RecommenderNet eagerly) and
refuses tensors that require gradients. Public entry point: :func:`rating_score`
(``torch.ops.rankfast.rating_score``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfast.kernels import mlp_score as ms
from rankfast.kernels._common import (
    INTERPRET,
    cast,
    check_device,
    check_dtype,
    check_index,
    configs,
    default_precision,
    pad_width,
    programs,
    weight_arg,
)

#: Most rating classes (the logits tile is ``[BLOCK_P, pad_width(C)]`` fp32).
MAX_CLASSES = 32


def _configs():
    """The autotune candidates: the ones that compile without spills and with wgmma dots for
    sm_90a at the benchmark shape (``bench/kernel_report.py``)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32, "BJ": 16, "TILE_U": 1}, num_warps=4, num_stages=1)]
    out = [
        triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BJ": 64, "TILE_U": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BJ": 64, "TILE_U": 4}, num_warps=4, num_stages=3),
    ]
    return configs(out, out[0])


_KEY = ["N_KEY", "H1P", "H2P", "H3P", "H4P", "CP", "NL", "ACT", "HAS_IDX"]


# --- device code ---------------------------------------------------------------------


@triton.autotune(configs=_configs(), key=_KEY)
@triton.heuristics(ms._tile_heuristics())
@triton.jit
def _rating_fwd_kernel(
    A,
    C,
    IDX,
    W2,
    B2,
    W3,
    B3,
    W4,
    B4,
    WC,
    BC,
    VALUES,
    OUT,
    B,
    N,
    H1,
    H2,
    H3,
    H4,
    NC,
    stride_a,
    stride_c,
    stride_ib,
    stride_in,
    stride_ob,
    N_KEY,
    NL: tl.constexpr,
    H1P: tl.constexpr,
    H2P: tl.constexpr,
    H3P: tl.constexpr,
    H4P: tl.constexpr,
    CP: tl.constexpr,
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
    """Persistent, as ``mlp_score``'s forward: program ``pid`` scores tiles ``pid, pid + P, ...``."""
    num_tiles = tl.cdiv(B, BLOCK_U) * tl.cdiv(N, BLOCK_N)
    k = tl.arange(0, CP)
    bias = tl.load(BC + k, mask=k < NC, other=-float("inf")).to(tl.float32)
    values = ms._vec(VALUES, k, NC)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        u64, n, item, rmask = ms._tile(tile, B, N, IDX, stride_ib, stride_in, BLOCK_U, BLOCK_N, HAS_IDX)
        logits = ms._mlp_pairs(
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
            WC,
            False,
            W2,
            B2,
            W3,
            B3,
            W4,
            B4,
            WC,
            NL,
            H2P,
            H4P,
            BJ1,
            BJ3,
            BLOCK_P,
            ACT,
            PREC,
            NC,
            CP,
        )
        logits += bias[None, :]
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        score = tl.sum(p * values[None, :], axis=1) / tl.sum(p, axis=1)
        tl.store(OUT + u64 * stride_ob + n, cast(score, OUT.dtype.element_ty), mask=rmask)


# --- host side -----------------------------------------------------------------------


def _check_inputs(a, c, idx, weights, biases, w_classes, b_classes, class_values, activation, precision):
    """The class head's shapes, dtypes and devices, then the hidden layers' by ``mlp_score``'s
    checks (the class weights' first row standing in for its one output unit); the activation id."""
    check_dtype("w_classes", w_classes)
    width = weights[-1].shape[0] if weights else a.shape[-1]
    if w_classes.dim() != 2 or w_classes.shape[1] != width or not 2 <= w_classes.shape[0] <= MAX_CLASSES:
        raise ValueError(
            f"w_classes: expected [C, {width}] (2..{MAX_CLASSES} classes over the last hidden layer), "
            f"got {tuple(w_classes.shape)}"
        )
    classes = w_classes.shape[0]
    for name, t in (("b_classes", b_classes), ("class_values", class_values)):
        if t.shape != (classes,):
            raise ValueError(f"{name}: expected [{classes}] (one per class), got {tuple(t.shape)}")
        check_device(name, t, a.device)
    check_dtype("b_classes", b_classes, w_classes.dtype)
    check_dtype("class_values", class_values)
    return ms._check_inputs(a, c, idx, None, None, weights, biases, w_classes[0], b_classes[:1], activation, precision)


def _rating_forward_impl(a, c, idx, weights, biases, w_classes, b_classes, class_values, activation, precision):
    act = _check_inputs(a, c, idx, weights, biases, w_classes, b_classes, class_values, activation, precision)
    lay = ms._Layers(a, weights, biases, w_classes, b_classes, None)
    a, c, idx_t, _, _, B, N, sib, sin, _ = ms._launch_args(a, c, idx, None, None)
    out = torch.empty(B, N, dtype=w_classes.dtype, device=a.device)
    if B == 0 or N == 0:
        return out
    cap = programs(a.device)

    def grid(meta):
        return (min(cap, triton.cdiv(B, meta["BLOCK_U"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    h1p, h2p, h3p, h4p = lay.pads
    _rating_fwd_kernel[grid](
        a,
        c,
        idx_t,
        *lay.tensors(),
        lay.bo,
        weight_arg(class_values),
        out,
        B,
        N,
        *lay.h,
        w_classes.shape[0],
        a.stride(0),
        c.stride(0),
        sib,
        sin,
        out.stride(0),
        ms._n_key(N),
        NL=lay.nl,
        H1P=h1p,
        H2P=h2p,
        H3P=h3p,
        H4P=h4p,
        CP=pad_width(w_classes.shape[0]),
        ACT=act,
        HAS_IDX=idx is not None,
        PREC=precision,
    )
    return out


# --- PyTorch operator ------------------------------------------------------------------


@torch.library.custom_op("rankfast::rating_score", mutates_args=())
def _rating_score_op(
    a: torch.Tensor,
    c: torch.Tensor,
    idx: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    w_classes: torch.Tensor,
    b_classes: torch.Tensor,
    class_values: torch.Tensor,
    activation: str,
    precision: str,
) -> torch.Tensor:
    return _rating_forward_impl(a, c, idx, weights, biases, w_classes, b_classes, class_values, activation, precision)


@_rating_score_op.register_fake
def _(a, c, idx, weights, biases, w_classes, b_classes, class_values, activation, precision):
    n = c.shape[0] if idx is None else idx.shape[-1]
    return a.new_empty(a.shape[0], n, dtype=w_classes.dtype)


def rating_score(
    a,
    c,
    idx=None,
    *,
    weights=(),
    biases=(),
    w_classes,
    b_classes,
    class_values,
    activation="relu",
    precision=None,
    check_ids=True,
):
    """Fused expected ratings ``[B, N]``: ``softmax(h_L W_classes^T + b_classes) @ class_values``
    with ``h_L`` the last hidden layer of the MLP whose first layer is split into ``a`` and ``c``.

    Args:
        a, c, idx, weights, biases, activation, precision, check_ids: as
            :func:`~rankfast.kernels.mlp_score.mlp_score` (every hidden layer activated).
        w_classes: ``[C, H_last]``, the output layer's weights (``nn.Linear`` layout),
            2 to :data:`MAX_CLASSES` classes.
        b_classes: ``[C]``, its biases.
        class_values: ``[C]``, the rating each class stands for.

    Not differentiable (scoring only): tensors that require gradients are refused while
    autograd records, rather than silently getting none.
    """
    tensors = [a, c, w_classes, b_classes, class_values, *weights, *biases]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "rating_score: the RecommenderNet kernel is inference-only (no backward); "
            "call it under torch.no_grad() or torch.inference_mode()"
        )
    if check_ids and idx is not None:
        check_index("idx", idx, c.shape[0])
    return torch.ops.rankfast.rating_score(
        a,
        c,
        idx,
        list(weights),
        list(biases),
        w_classes,
        b_classes,
        class_values,
        activation,
        default_precision(precision),
    )
