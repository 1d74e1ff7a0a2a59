"""Ids as callers give them: the one conversion and check behind every entry point.

Users pass ids as tensors, numpy arrays, lists, tuples or ranges; every entry
point (``rankfast.score``, ``rankfast.topk``'s exclusions, the baselines,
history pooling, the fused backend) turns them into int64 tensors here, so a
float, a bool, a ragged list or an id out of range gets the same error,
naming the argument, wherever it enters.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["as_ids", "check_range", "check_history", "check_k", "exclude_csr", "history_mask"]


def as_ids(name: str, value, *, ndims=(1,), high: int | None = None, device=None) -> torch.Tensor:
    """``value`` as an int64 tensor on ``device`` (default: where it is, or the CPU).

    Args:
        name: the argument's name, for errors.
        value: a tensor, numpy array, list, tuple or range of integers.
        ndims: the allowed numbers of dimensions.
        high: ids must lie in ``[0, high)`` (unchecked when None).
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, (np.ndarray, list, tuple, range)):
        try:
            arr = np.asarray(value)
        except ValueError as err:
            raise ValueError(f"{name}: not a rectangular array of ids ({err})") from err
        if arr.dtype == object:
            raise TypeError(f"{name}: expected integer ids")
        t = torch.from_numpy(arr)
    else:
        raise TypeError(f"{name}: expected a tensor, numpy array or list of ids, got {type(value).__name__}")
    if t.numel() == 0 and t.dtype.is_floating_point:
        t = t.long()  # an empty list or array is float64 to numpy: no ids, whatever the dtype
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer ids, got {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected {want}, got shape {tuple(t.shape)}")
    t = t.to(device=t.device if device is None else device, dtype=torch.int64)
    if high is not None:
        check_range(name, t, high)
    return t


def check_range(name: str, ids: torch.Tensor, high: int, *, low: int = 0) -> None:
    """Raises ``ValueError`` naming the first id of ``ids`` outside ``[low, high)``.

    One device sync on a GPU (an out-of-range id would read out of bounds in
    a kernel); skipped while ``torch.compile`` traces.
    """
    if not ids.numel() or torch.compiler.is_compiling():
        return
    bad = ids[(ids < low) | (ids >= high)]
    if bad.numel():
        raise ValueError(f"{name}: id {int(bad[0])} out of range [{low}, {high})")


def history_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True at the valid positions ``l < lengths[b]`` of padded histories."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(-1)


def check_history(history, lengths, *, num_items: int, rows: int | None = None, device=None, check_values=True):
    """Padded histories ``[B, L]`` and their valid lengths ``[B]`` as int64 tensors.

    Lengths lie in ``[0, L]``; valid slots hold item ids in ``[0, num_items)``
    (padding values are ignored); with ``rows`` there must be that many rows.
    ``check_values=False`` checks only types and shapes (the values need a device sync;
    a caller that checks them another way passes False).
    """
    history = as_ids("history", history, ndims=(2,), device=device)
    lengths = as_ids("lengths", lengths, ndims=(1,), device=history.device)
    if rows is not None and history.shape[0] != rows:
        raise ValueError(f"history: expected one row per user [B={rows}, L], got {tuple(history.shape)}")
    if lengths.shape[0] != history.shape[0]:
        raise ValueError(f"lengths: expected [B={history.shape[0]}], got {tuple(lengths.shape)}")
    max_len = history.shape[1]
    if check_values and lengths.numel() and not torch.compiler.is_compiling():  # a GPU sync; not while tracing
        if int(lengths.min()) < 0 or int(lengths.max()) > max_len:
            raise ValueError(
                f"lengths: each must lie in [0, L={max_len}], got [{int(lengths.min())}, {int(lengths.max())}]"
            )
        check_range("history", history[history_mask(lengths, max_len)], num_items)
    return history, lengths


def check_k(k, n: int | None = None) -> int:
    """``k`` of a top-K request: an int (not a bool), at least 0; with ``n``, the
    number of candidates, clamped to ``n``: nothing is sized by a ``k`` larger
    than what can come back."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return int(k) if n is None else min(int(k), n)


def exclude_csr(exclude, rows: int, n: int, *, one_row: bool = False):
    """Ids each of ``rows`` rows must not get back, as CPU int64 CSR ``(indptr, ids)``
    (``(None, None)`` for None), every id in ``[0, n)``.

    ``exclude``: a list of per-row id sequences, or CSR as a tuple ``(indptr,
    indices)`` or an object with ``indptr`` and ``indices`` (scipy's
    ``csr_matrix``); with ``one_row``, one id sequence for the single row.
    """
    if exclude is None:
        return None, None
    if one_row and not isinstance(exclude, tuple) and not hasattr(exclude, "indptr"):
        exclude = [exclude]
    if isinstance(exclude, tuple) or hasattr(exclude, "indptr"):
        if isinstance(exclude, tuple):
            if len(exclude) != 2:
                raise ValueError("exclude: a tuple must be CSR (indptr, indices)")
            indptr, ids = exclude
        else:
            indptr, ids = exclude.indptr, exclude.indices
        indptr = as_ids("exclude indptr", indptr, device="cpu")
        ids = as_ids("exclude indices", ids, device="cpu")
        if indptr.numel() != rows + 1:
            raise ValueError(f"exclude: indptr must have rows + 1 = {rows + 1} entries, got {indptr.numel()}")
        if int(indptr[0]) != 0 or bool((indptr[1:] < indptr[:-1]).any()) or int(indptr[-1]) != ids.numel():
            raise ValueError("exclude: indptr must start at 0, never decrease, and end at len(indices)")
    elif isinstance(exclude, (Sequence, np.ndarray)):
        if len(exclude) != rows:
            raise ValueError(f"exclude: expected one id sequence per row ({rows}), got {len(exclude)}")
        per_row = [as_ids(f"exclude[{i}]", _sequence(r), device="cpu") for i, r in enumerate(exclude)]
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([len(r) for r in per_row], dtype=torch.int64), 0, out=indptr[1:])
        ids = torch.cat(per_row) if per_row else torch.zeros(0, dtype=torch.int64)
    else:
        raise TypeError(
            f"exclude: expected a list of per-row ids or CSR (indptr, indices), got {type(exclude).__name__}"
        )
    check_range("exclude", ids, n)
    return indptr.contiguous(), ids.contiguous()


def _sequence(ids):
    """A row of ``exclude`` as :func:`as_ids` takes it (any sequence numpy can read, e.g. a pandas Series)."""
    return ids if isinstance(ids, (torch.Tensor, np.ndarray, list, tuple, range)) else np.asarray(ids)
