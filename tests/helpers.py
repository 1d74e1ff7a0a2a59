"""Shared test helpers (imported by test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np

#: Tolerance for float32 scores of O(1) computed two ways (another batch shape, another CPU's
#: BLAS kernels, float64): summation order moves the last bits of each term, so the error is
#: relative to the terms' size, not to a small score's; an absolute part covers that.
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6


def assert_rankings_match(got_ids, got_scores, want_ids, want_scores, *, rtol=SCORE_RTOL, atol=SCORE_ATOL):
    """Two best-first lists of one user (ids and scores) agree up to float rounding.

    Scores agree rank by rank within the tolerance. Ids agree too, except where
    the two computations may order a near-tie differently: an id may differ at a
    rank only if the reference holds it at a rank whose score is within the
    tolerance of this rank's score, or, when the reference list does not hold it
    at all, if its score ties the reference's last one (it was cut at the boundary).
    """
    got_ids, want_ids = list(got_ids), list(want_ids)
    got_scores = np.asarray(got_scores, dtype=np.float64)
    want_scores = np.asarray(want_scores, dtype=np.float64)
    assert len(got_ids) == len(want_ids) == len(got_scores) == len(want_scores), (got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=rtol, atol=atol)
    tol = 2 * (atol + rtol * np.abs(want_scores))  # both sides may have rounded
    position = {item: rank for rank, item in enumerate(want_ids)}
    for rank, (got, want) in enumerate(zip(got_ids, want_ids)):
        if got == want:
            continue
        other = position.get(got, len(want_ids) - 1)
        near = abs(want_scores[other] - want_scores[rank]) <= max(tol[other], tol[rank])
        assert near, f"rank {rank}: got item {got!r}, want {want!r}, and their scores are not a near-tie"
