"""Training losses on raw scores (logits). ``pos`` is ``[B]``, ``neg`` is ``[B, n]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mse_loss", "bce_loss", "bpr_loss", "sampled_softmax_loss", "full_softmax_loss", "LOSSES"]


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (rating regression)."""
    return F.mse_loss(pred, target)


def bce_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits: positives labelled 1, sampled negatives 0,
    averaged over all ``B * (1 + n)`` logits."""
    logits = torch.cat([pos[:, None], neg], dim=1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking: ``-log sigmoid(pos - neg)`` over every (positive, negative) pair."""
    return -F.logsigmoid(pos[:, None] - neg).mean()


def sampled_softmax_loss(
    pos: torch.Tensor, neg: torch.Tensor, log_q_pos: torch.Tensor, log_q_neg: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy of each positive against its sampled negatives,
    with logQ correction: every logit minus the log of its item's sampling
    probability, so that popular items (sampled more often) are not
    over-penalised and the loss estimates the full softmax."""
    logits = torch.cat([(pos - log_q_pos)[:, None], neg - log_q_neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.int64, device=logits.device))


def full_softmax_loss(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalogue, with score rows shared.

    ``logits [R, N]`` are the scores of ``R`` distinct rows (e.g. the users of
    a batch) against all ``N`` items; interaction ``b`` is row ``rows[b]``
    with positive item ``targets[b]``. Equal to
    ``F.cross_entropy(logits[rows], targets)`` without materialising the
    ``[B, N]`` repeat: each row's log-normaliser is computed once.
    """
    log_norm = torch.logsumexp(logits, dim=1)
    return (log_norm[rows] - logits[rows, targets]).mean()


#: ``ce``: cross-entropy over rating classes (task ``rating``, :class:`rankfast.models.RecommenderNet`).
LOSSES = ("mse", "bce", "bpr", "softmax", "ce")
