"""Top-K selection: each row's best k entries, and merging of per-shard lists.

One set of rules on every path (the C++ extension for CPU data, torch ops for
CUDA tensors or when the extension is missing):

* NaN ranks below every number, whatever ``largest`` says; ``-0.0`` ties ``0.0``;
* ties go to the lower index, so results are deterministic;
* ``k`` is clamped to the row length ``n``: results are ``[rows, min(k, n)]``,
  so a huge ``k`` costs no more than ``k = n``;
* a row with fewer than ``min(k, n)`` eligible entries (some excluded) is padded
  with index ``-1`` and value ``-inf`` (``+inf`` when ``largest=False``);
  ``k=0`` gives empty results.

Input dtypes: float32 and float64 are used as they are; float16 and bfloat16
are widened to float32 (exact, so the ranking is unchanged) and the values
come back in the input dtype. Non-contiguous input is copied first.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from rankfast._ids import check_k, exclude_csr

try:
    from rankfast import _C

    _EXT_ERROR = None
except ImportError as err:  # pure-Python install (RANKFAST_SKIP_EXT=1) or a broken build
    _C = None
    _EXT_ERROR = err

__all__ = ["topk", "topk_merge", "extension_available"]

_NATIVE = (torch.float32, torch.float64)
_WIDENED = (torch.float16, torch.bfloat16)
_fallback_warned = False


def extension_available() -> bool:
    """Whether the compiled selector (`rankfast._C`) is loaded."""
    return _C is not None


def topk(scores, k, *, exclude=None, largest=True, sorted=True, num_threads=None):
    """Returns ``(values, indices)`` of the ``k`` best entries of each row.

    Args:
        scores: 1-D ``[n]`` or 2-D ``[rows, n]`` numpy array or torch tensor.
            A CUDA tensor is processed on its device.
        k: how many entries to return per row (``>= 0``); a ``k`` above the
            row length ``n`` is taken as ``n``.
        exclude: ids each row must never return (e.g. already-seen items).
            For 2-D scores: a ``list`` of per-row id sequences (one per row),
            or CSR as a ``tuple`` ``(indptr, indices)`` or any object with
            ``indptr`` and ``indices`` attributes (scipy's ``csr_matrix``).
            For 1-D scores: one sequence of ids.
        largest: best means largest (``True``) or smallest (``False``).
        sorted: return each row best first; with ``False`` the order within a
            row is unspecified (padding still comes last).
        num_threads: threads for the C++ selector (default: all cores for
            large inputs); ignored by the torch paths.

    Returns:
        ``values`` in the input's dtype and int64 ``indices``, shaped
        ``[min(k, n)]`` or ``[rows, min(k, n)]``; torch in gives torch out,
        numpy in numpy out.
    """
    _check_num_threads(num_threads)
    x, restore = _as_2d_tensor(scores, "scores")
    rows, n = x.shape
    k = check_k(k, n)
    indptr, ids = exclude_csr(exclude, rows, n, one_row=restore.one_row)
    if x.is_cuda or _use_fallback():
        ineligible = None
        if indptr is not None:
            ineligible = _csr_to_mask(indptr, ids, rows, n, x.device)
        values, indices = _select_torch(x, k, largest, sorted, ineligible)
    else:
        excl = (None, None) if indptr is None else (indptr.numpy(), ids.numpy())
        values, indices = _C.topk(x.numpy(), k, largest, sorted, *excl, num_threads or 0)
        values, indices = torch.from_numpy(values), torch.from_numpy(indices)
    return restore(values, indices)


def topk_merge(values, indices, k, *, largest=True, sorted=True, num_threads=None):
    """Merges per-shard top-K lists into one top-``k`` list per row.

    Each shard scored part of the candidate set (another device or process)
    and returned its own ``(values, indices)`` with global item ids. Pass the
    shards' results concatenated along the last axis, or as lists of arrays
    to concatenate. Entries with index ``-1`` (padding) are ignored. Shards
    must be disjoint: an id present in two shards may be returned twice.
    Ids lie in ``[-1, 2^32 - 1)``. Same rules, dtypes and return types as
    :func:`topk`, with ``n`` the total length of the lists (``k`` is clamped
    to it); the values returned are the inputs' own (``-0.0`` stays ``-0.0``).
    """
    _check_num_threads(num_threads)
    if isinstance(values, (list, tuple)):
        values = _concat(values, "values")
    if isinstance(indices, (list, tuple)):
        indices = _concat(indices, "indices")
    x, restore = _as_2d_tensor(values, "values")
    ids = _as_2d_ids(indices, x.device)
    if tuple(ids.shape) != tuple(x.shape):
        raise ValueError(f"indices: shape {tuple(ids.shape)} does not match values {tuple(x.shape)}")
    k = check_k(k, x.shape[1])
    if x.is_cuda or _use_fallback():
        # Order each row by id so that "lower position" means "lower id", then
        # select with padding excluded, and map positions back to ids.
        ids_sorted, order = torch.sort(ids, dim=1, stable=True)
        picked_values, picked = _select_torch(x.gather(1, order), k, largest, sorted, ids_sorted < 0)
        picked_ids = ids_sorted.gather(1, picked.clamp_min(0))
        picked_ids = torch.where(picked < 0, picked, picked_ids)
        return restore(picked_values, picked_ids)
    out_values, out_ids = _C.merge(x.numpy(), ids.numpy(), k, largest, sorted, num_threads or 0)
    return restore(torch.from_numpy(out_values), torch.from_numpy(out_ids))


# --- the torch implementation (CUDA tensors, or no extension) -------------------------


def _order_keys(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys with the ranking order: NaN lowest, ``-0.0`` equal to ``0.0``.

    float32 keys fit in 32 bits (to be packed with a position); float64 keys
    leave ``int64 min`` free for the exclusion sentinel.
    """
    oriented = (x if largest else -x) + 0.0  # + 0.0 folds -0.0 onto 0.0
    if x.dtype == torch.float32:
        bits = oriented.view(torch.int32)
        keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
        nan_key = torch.iinfo(torch.int32).min
    else:
        bits = oriented.view(torch.int64)
        keys = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        nan_key = torch.iinfo(torch.int64).min + 1
    return torch.where(torch.isnan(x), torch.full_like(keys, nan_key), keys)


def _select_torch(x, k, largest, sorted, ineligible):
    """Row-wise top-k (``k <= n``) of a 2-D float32/float64 tensor, positions as ids."""
    n = x.shape[1]
    sentinel = torch.iinfo(torch.int64).min
    keys = _order_keys(x, largest)
    if x.dtype == torch.float32:
        # 32-bit score key and 32-bit reversed position packed into one unique
        # int64, so torch.topk needs no tie-breaking of its own.
        position = torch.arange(n, device=x.device, dtype=torch.int64)
        keys = (keys << 32) | (0xFFFFFFFF - position)
        if ineligible is not None:
            keys = keys.masked_fill(ineligible, sentinel)
        picked_keys, picked = torch.topk(keys, k, dim=1, largest=True, sorted=sorted)
    else:
        if ineligible is not None:
            keys = keys.masked_fill(ineligible, sentinel)
        picked_keys, picked = torch.sort(keys, dim=1, descending=True, stable=True)
        picked_keys, picked = picked_keys[:, :k], picked[:, :k]
    fill = float("-inf") if largest else float("inf")
    padding = picked_keys == sentinel
    values = x.gather(1, picked).masked_fill(padding, fill)
    picked = picked.masked_fill(padding, -1)
    if not sorted and ineligible is not None:
        # Keep the documented "padding last" rule for unsorted output too.
        order = torch.argsort(picked < 0, dim=1, stable=True)
        values, picked = values.gather(1, order), picked.gather(1, order)
    return values, picked


def _use_fallback() -> bool:
    global _fallback_warned
    if _C is not None:
        return False
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"rankfast: the C++ extension is not available ({_EXT_ERROR}); "
            "top-K runs on the slower torch fallback with the same results.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


# --- argument handling --------------------------------------------------------------


class _Restore:
    """Turns 2-D torch results back into the caller's kind, shape and dtype."""

    def __init__(self, kind, dtype, one_row):
        self.kind, self.dtype, self.one_row = kind, dtype, one_row

    def __call__(self, values, indices):
        values = values.to(self.dtype)
        if self.one_row:
            values, indices = values[0], indices[0]
        if self.kind == "numpy":
            return values.numpy(), indices.numpy()
        return values, indices


def _as_2d_tensor(scores, name):
    if isinstance(scores, np.ndarray):
        if scores.dtype == np.float16:  # widened into a C-ordered copy, whatever the input's layout
            x, dtype = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), torch.float16
        elif scores.dtype in (np.float32, np.float64):
            x = torch.from_numpy(np.ascontiguousarray(scores))
            dtype = x.dtype
        else:
            raise TypeError(f"{name}: unsupported dtype {scores.dtype}; use float16/32/64")
        kind = "numpy"
    elif isinstance(scores, torch.Tensor):
        x, dtype, kind = scores.detach(), scores.dtype, "torch"
        if dtype in _WIDENED:
            x = x.float()
        elif dtype not in _NATIVE:
            raise TypeError(f"{name}: unsupported dtype {dtype}; use float16/bfloat16/float32/float64")
        x = x.contiguous()
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(scores).__name__}")
    if x.dim() not in (1, 2):
        raise ValueError(f"{name}: expected 1-D or 2-D, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[-1] > 2**32 - 2:
        raise ValueError(f"{name}: rows longer than 2^32 - 2 entries are not supported")
    one_row = x.dim() == 1
    return (x.unsqueeze(0) if one_row else x), _Restore(kind, dtype, one_row)


def _as_2d_ids(indices, device):
    """Merge ids as a 2-D int64 tensor, each in ``[-1, 2^32 - 1)``: checked in the input's
    own dtype, so that an unsigned id such as ``2**64 - 1`` cannot wrap to the padding ``-1``."""
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.uint64:
        indices = indices.cpu().numpy()  # torch has no min/max of uint64
    if isinstance(indices, np.ndarray):
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices: expected integer ids, got {indices.dtype}")
    elif not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a numpy array or torch tensor, got {type(indices).__name__}")
    elif indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected integer ids, got {indices.dtype}")
    count = indices.size if isinstance(indices, np.ndarray) else indices.numel()
    if count and (int(indices.min()) < -1 or int(indices.max()) >= 2**32 - 1):
        raise ValueError("indices: ids must lie in [-1, 2^32 - 1)")
    if isinstance(indices, np.ndarray):
        indices = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
    ids = indices.detach().to(device=device, dtype=torch.int64).contiguous()
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def _concat(parts, name):
    if not parts:
        raise ValueError(f"{name}: empty list of shards")
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=-1)
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=-1)
    raise TypeError(f"{name}: shards must all be numpy arrays or all torch tensors")


def _check_num_threads(num_threads):
    if num_threads is None:
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads: expected an int or None, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")


def _csr_to_mask(indptr, ids, rows, n, device):
    mask = torch.zeros(rows, n, dtype=torch.bool, device=device)
    row_of = torch.repeat_interleave(torch.arange(rows), indptr[1:] - indptr[:-1])
    mask[row_of.to(device), ids.to(device)] = True
    return mask
