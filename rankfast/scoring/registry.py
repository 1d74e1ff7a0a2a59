"""The one dispatch point: which backend scores (and trains) a model.

Backends, each a module of :class:`~rankfast.scoring.protocol.Scorer` classes:

- ``reference``: the model's own forward over expanded pairs; covers every
  :class:`~rankfast.models.RankingModel`, so any model is scorable;
- ``factorized``: the models' forward restructured for users x candidates
  (split first layers, the attention unit per distinct history item) in
  eager PyTorch, on any device;
- ``fused``: the Triton kernels of ``rankfast.kernels`` (CUDA tensors, or the
  CPU under ``TRITON_INTERPRET=1``).

``RANKFAST_BACKEND`` chooses: ``auto`` (default) tries ``fused`` then
``factorized`` for CUDA models, ``factorized`` for others, and falls back to
``reference`` for a model they do not cover; ``reference``, ``factorized`` or
``fused`` (alias ``triton``) force one, and a model it does not cover is an error.
"""

from __future__ import annotations

import os

import torch

from rankfast.models.base import RankingModel
from rankfast.scoring.backends import factorized, reference
from rankfast.scoring.protocol import Scorer

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "backend_name",
    "backend_scorer",
    "select_scorer",
    "training_backend",
    "trains_fused",
]

BACKEND_ENV = "RANKFAST_BACKEND"
#: Accepted values of ``RANKFAST_BACKEND`` (``triton`` is an alias of ``fused``).
BACKENDS = ("auto", "reference", "factorized", "fused", "triton")


def backend_name() -> str:
    """The backend ``RANKFAST_BACKEND`` asks for: ``auto``, ``reference``, ``factorized`` or ``fused``."""
    name = os.environ.get(BACKEND_ENV, "") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKENDS}, got {name!r}")
    return "fused" if name == "triton" else name


#: ``auto`` on a GPU scores a DIN model against shared candidates through the factorized
#: backend's unit table (the unit once per candidate and distinct history item: cuBLAS matmuls
#: and a gather) rather than the fused kernel (once per pair and history slot, on tensor cores)
#: when the history's valid slots are at least this many times its distinct items
#: (:func:`~rankfast.scoring.backends.factorized.unit_table_reuse`). A prior, not yet
#: calibrated on a GPU: bench_kernels' DIN rows ``rankfast-factorized`` and ``rankfast-op``
#: measure the two sides on repeated and unrepeated histories.
GPU_UNIT_TABLE_MIN_REUSE = 4.0


def select_scorer(
    model: RankingModel, device: torch.device, history=None, lengths=None, *, shared: bool = True
) -> type[Scorer]:
    """The scorer class for ``model`` on ``device``, by ``RANKFAST_BACKEND``. ``history`` and
    ``lengths`` (checked, on ``device``) and ``shared`` (the candidates are the same for every
    user) let ``auto`` weigh a DIN model's unit table against the fused kernel on a GPU
    (:data:`GPU_UNIT_TABLE_MIN_REUSE`)."""
    name = backend_name()
    if name == "auto":
        order = ("fused", "factorized") if device.type == "cuda" else ("factorized",)
        if (
            shared
            and "fused" in order
            and factorized.unit_table_reuse(model, history, lengths) >= GPU_UNIT_TABLE_MIN_REUSE
        ):
            order = ("factorized",)
        for candidate in order:
            scorer = backend_scorer(candidate, model)
            if scorer is not None:
                return scorer
        return reference.ReferenceScorer
    return backend_scorer(name, model, required=True)


def trains_fused(model: RankingModel) -> bool:
    """The same dispatch for training: whether :func:`rankfast.fit` computes
    ``model``'s scores through the fused forward and backward kernels (no
    per-pair activations stored).

    Only when ``RANKFAST_BACKEND`` is ``fused``: the GPU measurements so far
    have a training step through the kernels slower than eager PyTorch
    (``bench/results/``), so by default training runs the model's own
    forward. A model the kernels cannot run, or one with dropout (which the
    kernels lack), is then an error."""
    if backend_name() != "fused":
        return False
    scorer = backend_scorer("fused", model, required=True)
    if not getattr(scorer, "trains", True):
        raise ValueError(
            f"{BACKEND_ENV}=fused: the fused kernels score this {type(model).__name__} but do not train it; "
            f"unset {BACKEND_ENV} to train it eagerly"
        )
    if model.config.dropout > 0:
        raise ValueError(
            f"{BACKEND_ENV}=fused: the fused kernels have no dropout, and this model's "
            f"dropout is {model.config.dropout}"
        )
    return True


def training_backend(model: RankingModel) -> str | None:
    """The backend whose ``training_scores`` :func:`rankfast.fit` scores ``model`` through
    when each user is ranked against its own sampled candidates: ``"fused"`` when
    :func:`trains_fused`; ``"factorized"`` by default (``auto`` or ``factorized``) for the
    models it covers (AttentionModel: the unit once per distinct candidate and history
    item); None for the model's own forward over expanded pairs (other models, or
    ``RANKFAST_BACKEND=reference``)."""
    if trains_fused(model):
        return "fused"
    if backend_name() in ("auto", "factorized") and factorized.trains(model):
        return "factorized"
    return None


def _fused_backend():
    from rankfast.scoring.backends import fused  # imports Triton, so only when asked for

    return fused


#: Each backend module has ``scorer_for(model) -> Scorer class | None``.
_BACKEND_MODULES = {"reference": lambda: reference, "factorized": lambda: factorized, "fused": _fused_backend}


def backend_scorer(name: str, model: RankingModel, *, required: bool = False) -> type[Scorer] | None:
    """Backend ``name``'s scorer class for ``model``, or None where it has none (an error with ``required``)."""
    try:
        backend = _BACKEND_MODULES[name]()
    except ImportError as err:  # Triton missing or broken
        if required:
            raise ValueError(f"{BACKEND_ENV}={name}: the {name} backend cannot be imported ({err})") from err
        return None
    scorer = backend.scorer_for(model)
    if scorer is None and required:
        raise ValueError(
            f"{BACKEND_ENV}={name}: the {name} backend does not cover this {type(model).__name__} ({model.config})"
        )
    return scorer
