"""Candidate positions: excluded item ids -> the positions holding them, chosen positions -> item ids.

Scorers see candidates by position (column ``j`` of a user's row of scores);
callers exclude and receive item ids. Exclusions arrive as CSR over users
``(indptr, item ids)`` (:func:`rankfast.selection.exclude_csr`) and leave as
CSR over the same users of candidate positions, which is what
:func:`rankfast.topk` and the fused top-K kernels skip.
"""

from __future__ import annotations

import torch

__all__ = ["csr_rows", "excluded_positions", "positions_to_ids"]


def excluded_positions(candidates: torch.Tensor, exclude: tuple[torch.Tensor, torch.Tensor]):
    """CSR ``(indptr, positions)``: for each user of ``exclude``, every position of
    ``candidates`` (``[N]`` shared, or ``[U, N]`` one row per user) holding one of its
    excluded ids (all of them, if an id repeats); ids that are not candidates are ignored."""
    indptr, ids = exclude
    candidates = candidates.cpu()
    if candidates.dim() == 2:
        return _per_user_positions(candidates, indptr, ids)
    sorted_ids, order = torch.sort(candidates, stable=True)
    lo = torch.searchsorted(sorted_ids, ids, right=False)
    counts = torch.searchsorted(sorted_ids, ids, right=True) - lo
    ends = torch.cumsum(counts, 0)
    offsets = torch.arange(int(ends[-1]) if ends.numel() else 0) - torch.repeat_interleave(ends - counts, counts)
    positions = order[torch.repeat_interleave(lo, counts) + offsets]
    new_indptr = torch.cat([ends.new_zeros(1), ends])[indptr]
    return new_indptr, positions


def _per_user_positions(candidates, indptr, ids):
    num = candidates.shape[0]
    span = 1 + max(int(candidates.max()) if candidates.numel() else 0, int(ids.max()) if ids.numel() else 0)
    row_of = torch.repeat_interleave(torch.arange(num), indptr[1:] - indptr[:-1])
    mask = torch.isin(candidates + torch.arange(num).unsqueeze(1) * span, row_of * span + ids)
    new_indptr = torch.cat([indptr.new_zeros(1), torch.cumsum(mask.sum(1), 0)])
    return new_indptr, mask.nonzero()[:, 1]


def csr_rows(csr: tuple[torch.Tensor, torch.Tensor], rows: slice):
    """Rows ``rows`` of a CSR ``(indptr, indices)``, re-based to start at 0."""
    indptr, ids = csr
    part = indptr[rows.start : rows.stop + 1]
    return part - part[0], ids[int(part[0]) : int(part[-1])]


def positions_to_ids(positions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidate positions ``[U, k]`` (``-1``: padding, kept) -> item ids, through
    ``candidates`` ``[N]`` (shared) or ``[U, N]``."""
    rows = positions.shape[0]
    cand = candidates.expand(rows, -1)
    lookup = torch.cat([cand, cand.new_full((rows, 1), -1)], dim=1)
    return lookup.gather(1, positions.masked_fill(positions < 0, cand.shape[1]))
