"""Training steps through the fused Triton kernels (see :func:`rankfast.scoring.trains_fused`)."""

from __future__ import annotations

import torch

from rankfast.models import RankingModel


class FusedScores(torch.nn.Module):
    """``forward(users [B], items [B, W] | None, history, lengths) -> [B, W]``:
    each user against its own candidates (the positive and its sampled
    negatives), or against every item (``items=None``, the full softmax),
    through the fused forward and backward kernels. The [B, W] pairs never
    materialise per-pair activations, and a user's history is read once for
    all its candidates. A module, so that DistributedDataParallel can wrap it
    and synchronise the model's gradients."""

    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from rankfast.scoring.backends.fused import training_scores  # Triton is imported only when used

        # The batches' ids were checked when the data was loaded: no device sync per step.
        return training_scores(self.model, users, items, history, lengths, validate=False)
