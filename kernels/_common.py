"""Pieces shared by the fused kernels: activations and their derivatives,
weight padding, dtype rules, and the interpreter switch.

Widths are padded to powers of two (at least 16, the smallest ``tl.dot``
operand dimension) with zeros. That is exact: a padded unit gets a zero
pre-activation, ``act(0) = 0`` for ReLU, GELU and SiLU, and its outgoing
weights are zero too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rankfast._ids import check_range

#: True when kernels run on the CPU through Triton's interpreter (tests without a GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2}
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECISIONS = ("tf32", "ieee")

#: ``RANKFAST_AUTOTUNE=0``: one default launch configuration per kernel on a GPU
#: instead of autotuning (quick correctness runs; every new shape otherwise
#: compiles and times each candidate configuration).
AUTOTUNE = os.environ.get("RANKFAST_AUTOTUNE", "1") != "0"


def configs(all_configs, default):
    """The autotune candidates: ``default`` alone under the interpreter or with autotuning off."""
    if INTERPRET or not AUTOTUNE:
        return [default]
    return all_configs


#: Largest layer width the kernels take (registers and shared memory on a GPU).
MAX_WIDTH = 512


def pad_width(n: int) -> int:
    """The padded width of a layer: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


def padded_t(weight: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``weight [out, in]`` (nn.Linear layout) transposed to ``[in, out]`` and zero-padded to ``[rows, cols]``."""
    out = weight.new_zeros(rows, cols, dtype=dtype)
    out[: weight.shape[1], : weight.shape[0]] = weight.detach().t().to(dtype)
    return out


def padded_vec(vec: torch.Tensor | None, n: int, dtype=torch.float32, like: torch.Tensor | None = None) -> torch.Tensor:
    """A 1-D vector zero-padded to ``n`` (zeros when ``vec`` is None)."""
    if vec is None:
        return like.new_zeros(n, dtype=dtype)
    out = vec.new_zeros(n, dtype=dtype)
    out[: vec.numel()] = vec.detach().reshape(-1).to(dtype)
    return out


def check_activation(activation: str) -> int:
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATION_IDS)}, got {activation!r}")
    return ACTIVATION_IDS[activation]


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None):
    if dtype is None:
        if t.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype} (the dtype of the other inputs), got {t.dtype}")


def check_split_term(name: str, t: torch.Tensor, dtype: torch.dtype):
    """A split first layer's per-user or per-item term: the model's dtype or float32."""
    if t.dtype not in (dtype, torch.float32):
        raise TypeError(f"{name}: expected {dtype} (the model's dtype) or float32, got {t.dtype}")


def split_term(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32 whatever the model's dtype (autocast off): one term of a
    first layer split into per-user and per-item parts (docs/design.md). The kernels add a pair's terms
    in fp32, so like the unsplit layer, whose output is rounded once, a bf16 model rounds only
    their sum; bf16 terms would each be rounded, a larger error where they cancel."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


def check_device(name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_index(name: str, idx: torch.Tensor, high: int):
    """A candidate index: int32 or int64 rows in ``[0, high)`` (an id out of range would read out of bounds)."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64 ids, got {idx.dtype}")
    check_range(name, idx, high)


# --- device code ---------------------------------------------------------------------


@triton.jit
def _erf(x):
    return tl.math.erf(x)


@triton.jit
def act_fn(x, ACT: tl.constexpr):
    """ReLU (0), exact GELU (1, as torch's default) or SiLU (2) of an fp32 tensor."""
    if ACT == 0:
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch
    elif ACT == 1:
        y = 0.5 * x * (1.0 + _erf(x * 0.7071067811865476))
    else:
        y = x / (1.0 + tl.exp(-x))
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx, matching torch's backward (ReLU: 1 where x > 0, else 0)."""
    if ACT == 0:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 1:
        g = 0.5 * (1.0 + _erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
        g = s * (1.0 + x * (1.0 - s))
    return g


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc=None, PREC: tl.constexpr = "tf32"):
    """``tl.dot`` with fp32 accumulation. Triton's interpreter mis-multiplies
    bfloat16 operands, so there they are widened to fp32 first (exact: the
    same products and fp32 sums as the tensor-core path)."""
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def item_rows(IDX, row, n, mask, stride_ib, stride_in, HAS_IDX: tl.constexpr):
    """int64 item-table rows of user ``row``'s candidate positions ``n``: ``IDX[row, n]``
    with a candidate index (``stride_ib`` 0 when all users share it), else ``n`` itself."""
    if HAS_IDX:
        item = tl.load(IDX + row * stride_ib + n.to(tl.int64) * stride_in, mask=mask, other=0).to(tl.int64)
    else:
        item = n.to(tl.int64)
    return item


@triton.jit
def cast(x, DT: tl.constexpr):
    """``x.to(DT)`` rounding to nearest even. On a GPU that is what ``.to`` does;
    Triton's interpreter truncates to bfloat16 instead (a biased error that
    would make CPU results look worse than the GPU's), so there the rounding
    is done on the bits first."""
    if _INTERP:
        if DT == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DT)


def default_precision(precision: str | None) -> str:
    """``precision`` if given, else PyTorch's setting: TF32 dots when
    ``torch.get_float32_matmul_precision()`` is "high" or "medium" (as
    ``torch.backends.cuda.matmul.allow_tf32``), full fp32 ("ieee") when it is
    "highest" (PyTorch's default). Only fp32 inputs are affected."""
    if precision is None:
        return _torch_precision()
    return check_precision(precision)


@torch.compiler.assume_constant_result
def _torch_precision() -> str:
    # A constant while tracing: torch.compile(fullgraph=True) cannot put a string-valued
    # torch call in its graph (Dynamo guards on the setting, so changing it recompiles).
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
