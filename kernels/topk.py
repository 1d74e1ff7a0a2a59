"""Running top-K inside the scoring kernels (score + top-K fused), and its host helpers.

Same rules as :func:`rankfast.topk` (``largest=True``, sorted): NaN ranks below
every number, ``-0.0`` ties ``0.0``, ties go to the lower candidate position,
excluded positions are never returned, and a row with fewer than ``k``
eligible candidates is padded with position ``-1`` and value ``-inf``.

Each candidate becomes one unique int64 key, as in ``rankfast.selection``:
the score's order-preserving 32-bit key in the high half (NaN lowest) and
``0xFFFFFFFF - position`` in the low half, so a larger key is a better entry
and equal scores prefer the lower position; excluded or out-of-range
candidates get ``INT64_MIN``. A program keeps the best ``R`` keys of its user
(``R`` = the candidate tile, a power of two >= k) sorted descending; a new
tile is sorted ascending, ``max(running[i], tile[i])`` is the best ``R`` of
the union (the first step of a bitonic merge), and one more sort restores the
order. Only ``[B, k]`` keys are written (``[B, S, k]`` when ``S`` programs
split a user's candidates; the host then keeps the best ``k`` of the ``S * k``
with ``torch.topk`` on the unique keys, which is exact) and decoded into
positions and values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfast import _ids

#: Largest k the fused top-K takes (its running list lives in registers).
MAX_K = 256

_SENTINEL = tl.constexpr(-(2**63))


@triton.constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.jit
def tile_keys(score, pos, eligible):
    """int64 keys of fp32 ``score`` at candidate positions ``pos`` (``INT64_MIN`` where not ``eligible``)."""
    s = score + 0.0  # folds -0.0 onto 0.0
    bits = s.to(tl.int32, bitcast=True)
    k32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    k32 = tl.where(score != score, -2147483648, k32)
    low = (tl.full([1], 1, tl.int64) << 32) - 1  # 0xFFFFFFFF as int64, whatever the literal rules
    key = (k32.to(tl.int64) << 32) | (low - pos.to(tl.int64))
    return tl.where(eligible, key, _SENTINEL)


@triton.jit
def merge(running, keys):
    """Best ``R`` of ``running`` (sorted descending) and ``keys`` (any order, ``R`` of them or a
    power of two fewer: padded with ``INT64_MIN``), sorted descending."""
    for _ in tl.static_range(_log2(running.shape[0] // keys.shape[0])):
        keys = tl.reshape(tl.join(keys, tl.full(keys.shape, _SENTINEL, tl.int64)), (2 * keys.shape[0],))
    tile = tl.sort(keys, descending=False)
    return tl.sort(tl.maximum(running, tile), descending=True)


@triton.jit
def store_keys(running, OUT, row, K, R: tl.constexpr):
    """Writes the first ``K`` keys of ``running`` (sorted descending) to ``OUT[row, :K]``."""
    r = tl.arange(0, R)
    tl.store(OUT + row.to(tl.int64) * K + r, running, mask=r < K)


@triton.jit
def excluded(EXCL, row, stride_e, pos, mask, HAS_EXCL: tl.constexpr):
    """Whether each candidate position is excluded for user ``row`` (bit ``pos`` of its bitmask row)."""
    if HAS_EXCL:
        word = tl.load(EXCL + row * stride_e + (pos >> 5), mask=mask, other=0)
        out = ((word >> (pos & 31)) & 1) != 0
    else:
        out = pos < 0
    return out


def running_size(k: int, block: int) -> int:
    """The running list's length: the candidate tile, a power of two >= max(k, 16)."""
    return max(16, triton.next_power_of_2(max(1, k)), block)


def auto_splits(num_users: int, num_candidates: int, r: int, device: torch.device) -> int:
    """How many programs share one user's candidates in the fused top-K: enough
    programs to fill the GPU (4 per SM) when there are few users."""
    tiles = triton.cdiv(max(1, num_candidates), r)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(4 * sms, max(1, num_users))))


def launch_plan(num_users: int, num_candidates: int, k, tile: int, splits: int, exclude_mask, device):
    """The fused top-K's launch: ``(k, r, splits, chunk, keys)``: ``k`` checked, the running
    list's length ``r`` for candidate tiles of ``tile``, programs per user (``splits <= 0``:
    :func:`auto_splits`), the candidates each program takes (``chunk``, a multiple of ``r``), and
    the output keys ``[B, splits, k]``, all ``INT64_MIN`` (nothing yet). Checks ``exclude_mask``."""
    B, N = num_users, num_candidates
    k = check_k(k)
    r = running_size(k, tile)
    splits = auto_splits(B, N, r, device) if splits <= 0 else min(splits, max(1, triton.cdiv(N, r)))
    chunk = triton.cdiv(triton.cdiv(max(N, 1), r), splits) * r
    if exclude_mask is not None and (
        exclude_mask.shape != (B, triton.cdiv(N, 32)) or exclude_mask.dtype != torch.int32
    ):
        raise ValueError(
            f"excl: expected an int32 bitmask [B={B}, ceil(N/32)={triton.cdiv(N, 32)}], "
            f"got {tuple(exclude_mask.shape)} {exclude_mask.dtype}"
        )
    keys = torch.full((B, splits, k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    return k, r, splits, chunk, keys


def check_k(k) -> int:
    """A top-K request's ``k``, within the fused top-K's limit :data:`MAX_K`."""
    k = _ids.check_k(k)
    if k > MAX_K:
        raise ValueError(f"k: the fused top-K takes k <= {MAX_K}, got {k} (use rankfast.score's unfused path)")
    return k


def positions_bitmask(
    indptr: torch.Tensor, positions: torch.Tensor, num_rows: int, num_candidates: int, device
) -> torch.Tensor:
    """Excluded candidate positions, CSR ``(indptr, positions)`` over rows, as the kernels'
    int32 bitmask ``[rows, ceil(N / 32)]`` (bit ``p % 32`` of word ``p // 32`` set for position ``p``)."""
    words = (num_candidates + 31) // 32
    rows = torch.repeat_interleave(torch.arange(num_rows), (indptr[1:] - indptr[:-1]).cpu())
    flat = torch.unique(rows * num_candidates + positions.cpu())  # each (row, position) once, so bits can be added
    rows, pos = flat // num_candidates, flat % num_candidates
    mask = torch.zeros(num_rows * words, dtype=torch.int64)
    mask.index_add_(0, rows * words + pos // 32, torch.ones_like(pos) << (pos % 32))
    mask = torch.where(mask >= 2**31, mask - 2**32, mask)  # as int32 bit patterns
    return mask.to(torch.int32).view(num_rows, words).to(device)


def decode_keys(keys: torch.Tensor, k: int, dtype: torch.dtype):
    """Keys ``[B, S, k]`` (each split sorted descending) -> ``(positions, values)`` ``[B, k]``."""
    b, splits, _ = keys.shape
    keys = keys.reshape(b, splits * k)
    if splits > 1:
        keys = torch.topk(keys, k, dim=1, sorted=True).values
    pad = keys == torch.iinfo(torch.int64).min
    low = 0xFFFFFFFF
    positions = torch.where(pad, torch.full_like(keys, -1), low - (keys & low))
    k32 = (keys >> 32).to(torch.int32)
    bits = torch.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32)
    values = bits.view(torch.float32)
    values = torch.where(k32 == torch.iinfo(torch.int32).min, torch.full_like(values, float("nan")), values)
    values = torch.where(pad, torch.full_like(values, float("-inf")), values)
    return positions, values.to(dtype)
