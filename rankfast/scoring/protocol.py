"""The contract between :func:`rankfast.score` and its backends.

``score`` cuts a request into blocks of users, chunks of candidates and tiles
of (users x candidates) sized to a memory budget (:mod:`rankfast.scoring.plan`),
and drives one :class:`Scorer` per block. A backend is a set of scorer
classes, one per model type it covers (:mod:`rankfast.scoring.registry`).
Every scorer computes what the model's ``forward`` computes for each pair: the
float64 forward is the reference all of them are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from rankfast.models.base import RankingModel

__all__ = ["Footprint", "Scorer"]


@dataclass(frozen=True)
class Footprint:
    """Elements (of the model's dtype) a scorer holds per user of a block, per
    candidate of a chunk, and per pair of a tile; ``table``: more per candidate
    of a chunk, held only with candidates shared by the block's users."""

    user: int
    item: int
    pair: int
    table: int = 0


class Scorer(Protocol):
    """Scores one block of users, a tile at a time.

    ``__init__`` computes the block's user-side terms; :meth:`items` the
    item-side terms of a chunk of candidates; :meth:`pairs` the scores of a
    tile of the block's users against them. All run under
    ``torch.inference_mode`` with the model in eval mode. Backends subclass
    this class to inherit its defaults (no fused top-K, thread-safe tiles).
    """

    #: Largest ``k`` of :meth:`topk` (0: the scorer has no fused score + top-K;
    #: ``score`` then selects from the tile scores with :func:`rankfast.topk`).
    max_fused_k: ClassVar[int] = 0
    #: Whether tiles of one block may be scored on several CPU threads at once.
    thread_safe: ClassVar[bool] = True

    def __init__(
        self, model: RankingModel, users: torch.Tensor, history: torch.Tensor | None, lengths: torch.Tensor | None
    ) -> None:
        """``users [U]``; ``history [U, L]`` and ``lengths [U]`` for models that read histories."""

    def items(self, ids: torch.Tensor) -> Any:
        """Item-side terms of candidates ``[Nc]`` (shared by the block) or ``[T, Nc]`` (per user)."""

    def pairs(self, rows: slice, state: Any) -> torch.Tensor:
        """Scores ``[T, Nc]`` of the block's users ``rows`` against the candidates of ``state``."""

    def topk(
        self, rows: slice, state: Any, k: int, skip: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused score + top-K (only when ``max_fused_k`` > 0): ``(positions, values)`` ``[T, k]``
        of each user's best candidates of ``state``, with the rules of :func:`rankfast.topk`;
        ``skip``: CSR ``(indptr, positions)`` over ``rows`` of candidate positions to leave out."""
        raise NotImplementedError(f"{type(self).__name__} has no fused top-K")

    @staticmethod
    def footprint(model: RankingModel, history_len: int) -> Footprint:
        """What one block holds, for sizing blocks, chunks and tiles to the memory budget."""
