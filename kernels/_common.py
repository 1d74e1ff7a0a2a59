"""Pieces shared by the fused kernels: activations and their derivatives,
dtype rules, the programs of persistent kernels, owner-only accumulation,
and the interpreter switch.

Kernels read the layers' weights where they are, in ``nn.Linear`` layout
(``[out, in]``, contiguous), with masked loads: tiles have power-of-two
widths (at least 16, the smallest ``tl.dot`` operand dimension) and the
masked lanes read zeros, which is exact (a zero pre-activation gives
``act(0) = 0`` for ReLU, GELU and SiLU, and its outgoing weights are zero
too). Nothing is padded or copied per call, so a call does no work on the
weights before its kernel starts.

Backward kernels accumulate without atomics: each gradient row belongs to
one program (weights and biases: the program's own slot; rows shared by
several programs: the program's slot of a workspace), which adds into it with
a plain load and store (:func:`accumulate`), in a fixed order; the slots are
summed afterwards. Gradients are therefore the same, bit for bit, from one
run to the next on a given GPU.
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
    """The tile width of a layer: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


def weight_arg(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as a kernel reads it: contiguous (a parameter already is: no copy), no autograd."""
    return weight.detach().contiguous()


def programs(device: torch.device, per_sm: int = 2) -> int:
    """Programs of a persistent kernel: ``per_sm`` per SM on a GPU, 4 under the interpreter
    (so that the tests cover programs taking several tiles and several programs per workspace)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def ownership(
    num_programs: int,
    user_bytes: int,
    cand_bytes: int,
    user_blocks: int,
    cand_blocks: int,
):
    """``(G, C)``: a backward's programs as ``G`` groups of users x ``C`` groups of candidates.

    Program ``(g, c)`` takes the tiles of user blocks ``g, g + G, ...`` and candidate blocks
    ``c, c + C, ...``. Rows of users are then shared by the ``C`` programs of a user group, rows of
    candidates by the ``G`` programs of a candidate group; each program owns one slot of a
    ``[C, users...]`` and of a ``[G, candidates...]`` workspace. ``user_bytes``, ``cand_bytes``:
    one slot's size (0 for candidate rows kept per pair, which no two programs share). ``C`` is
    chosen to minimise the workspaces' size ``C * user_bytes + G * cand_bytes`` at ``G * C``
    about ``num_programs``."""
    c = round((num_programs * cand_bytes / max(1, user_bytes)) ** 0.5) if cand_bytes else 1
    c = max(1, min(c, cand_blocks, num_programs))
    g = max(1, min(num_programs // c, user_blocks))
    return g, c


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


def check_index_layout(idx: torch.Tensor | None, rows: int, device: torch.device):
    """A candidate index ``idx`` (None: none): ``[N]`` shared or ``[B=rows, N]`` per row, int32 or
    int64, on ``device``."""
    if idx is None:
        return
    if idx.dim() not in (1, 2) or (idx.dim() == 2 and idx.shape[0] != rows):
        raise ValueError(f"idx: expected [N] or [B={rows}, N], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx: expected int32 or int64 ids, got {idx.dtype}")
    check_device("idx", idx, device)


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
def accumulate(ptr, val, mask=None):
    """``*ptr += val`` with a plain load and store: only for memory this program alone writes
    (a gradient slot or workspace row it owns). A loop that accumulates into the same memory
    again starts its iteration with ``tl.debug_barrier()``, so that each thread sees what the
    others stored."""
    tl.store(ptr, tl.load(ptr, mask=mask) + val, mask=mask)


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


@triton.jit
def mul(a, b):
    """``a * b`` in the inputs' dtype: for bf16/fp16 one rounding of the exact product, as on a
    GPU. Triton's interpreter cannot do half-precision arithmetic, so there it multiplies in fp32
    and rounds with :func:`cast`."""
    if _INTERP:
        if a.dtype != tl.float32:
            return cast(a.to(tl.float32) * b.to(tl.float32), a.dtype)
    return a * b


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
