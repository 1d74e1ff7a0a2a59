"""Scoring: :func:`score` and the backends behind it.

- :mod:`~rankfast.scoring.api`: ``score``, the public entry point;
- :mod:`~rankfast.scoring.protocol`: the :class:`Scorer` contract and :class:`Footprint`;
- :mod:`~rankfast.scoring.registry`: the one dispatch point (device, ``RANKFAST_BACKEND``);
- :mod:`~rankfast.scoring.plan`: blocks, chunks and tiles within a memory budget;
- :mod:`~rankfast.scoring.positions`: excluded ids to candidate positions and back;
- :mod:`~rankfast.scoring.backends`: ``reference``, ``factorized`` and ``fused``.
"""

from rankfast.scoring.api import DEFAULT_MEMORY_BUDGET, score
from rankfast.scoring.protocol import Footprint, Scorer
from rankfast.scoring.registry import BACKEND_ENV, BACKENDS, select_scorer, training_backend, trains_fused

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "DEFAULT_MEMORY_BUDGET",
    "Footprint",
    "Scorer",
    "score",
    "select_scorer",
    "training_backend",
    "trains_fused",
]
