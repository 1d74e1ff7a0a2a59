"""Training steps that score each user against its own candidates through a scoring backend
(see :func:`rankfast.scoring.registry.training_backend`)."""

from __future__ import annotations

import torch

from rankfast.models import RankingModel
from rankfast.scoring.backends import factorized


class CandidateScores(torch.nn.Module):
    """``forward(users [B], items [B, W] | None, history, lengths) -> [B, W]``:
    each user against its own candidates (the positive and its sampled
    negatives), or against every item (``items=None``, the full softmax; fused
    only), through backend ``backend``'s ``training_scores``: ``"fused"``, the
    fused forward and backward kernels (no per-pair activations stored);
    ``"factorized"``, the model's forward restructured in eager PyTorch (a
    user's history read once for all its candidates). A module, so that
    DistributedDataParallel can wrap it and synchronise the model's gradients."""

    def __init__(self, model: RankingModel, backend: str):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.backend == "fused":
            from rankfast.scoring.backends import fused  # Triton is imported only when used

            # The batches' ids were checked when the data was loaded: no device sync per step.
            return fused.training_scores(self.model, users, items, history, lengths, validate=False)
        return factorized.training_scores(self.model, users, items, history, lengths)
