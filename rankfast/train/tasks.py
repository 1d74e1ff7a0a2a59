"""What a training run learns: ``TrainConfig.task`` and the losses and negatives each task takes.

- ``"ranking"``: implicit feedback; every interaction is a positive, ranked against
  sampled items (``bce``, ``bpr``, ``softmax``) or the catalogue (``softmax`` with
  ``negatives="all"`` / ``"partition"``).
- ``"click"``: labelled impressions (0/1 labels in ``data.ratings``); point-wise
  log-loss (``bce``) on exactly those rows. Only data with positives alone (no
  labels, or all 1) may add sampled negatives labelled 0, and only when
  ``negatives`` asks for them (``"uniform"`` or ``"popularity"``, ``num_negatives``
  a row).
- ``"rating"``: explicit ratings; regression (``mse``) or classification over a
  :class:`rankfast.models.RecommenderNet`'s rating classes (``ce``, cross-entropy).

A config that mixes these (a ranking loss for ratings, negatives for labelled
rows...) is a ``ValueError`` naming both settings.
"""

from __future__ import annotations

from rankfast.train.losses import LOSSES

__all__ = ["TASKS", "TASK_LOSSES", "TASK_NEGATIVES", "resolve_task"]

TASKS = ("ranking", "click", "rating")
#: The losses each task takes; the first is its default.
TASK_LOSSES = {"ranking": ("bce", "bpr", "softmax"), "click": ("bce",), "rating": ("mse", "ce")}
#: The ``negatives`` each task takes; the first is its default ("none": no sampled negatives).
TASK_NEGATIVES = {
    "ranking": ("uniform", "popularity", "all", "partition"),
    "click": ("none", "uniform", "popularity"),
    "rating": ("none",),
}
NEGATIVES = ("none", "uniform", "popularity", "all", "partition")


def resolve_task(config) -> None:
    """Fills ``config.task``, ``loss``, ``negatives`` and ``monitor`` where they are None
    (a task without one is ``"rating"`` for the losses ``mse`` and ``ce``, else
    ``"ranking"``), and checks that they fit together."""
    for name, known in (("loss", LOSSES), ("negatives", NEGATIVES)):
        value = getattr(config, name)
        if value is not None and value not in known:
            raise ValueError(f"{name}: expected one of {known}, got {value!r}")
    if config.task is None:
        config.task = "rating" if config.loss in TASK_LOSSES["rating"] else "ranking"
    if config.task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {config.task!r}")
    losses, negatives = TASK_LOSSES[config.task], TASK_NEGATIVES[config.task]
    if config.loss is None:
        config.loss = losses[0]
    if config.loss not in losses:
        others = [t for t, allowed in TASK_LOSSES.items() if config.loss in allowed]
        hint = f"; loss {config.loss!r} is for task {others[0]!r}" if others else ""
        raise ValueError(f"loss: task {config.task!r} takes {list(losses)}, got {config.loss!r}{hint}")
    if config.negatives is None:
        config.negatives = negatives[0]
    if config.negatives not in negatives:
        raise ValueError(f"negatives: task {config.task!r} takes {list(negatives)}, got {config.negatives!r}")
    if config.monitor is None:
        ks = tuple(int(k) for k in config.eval_ks)
        config.monitor = {"ranking": f"ndcg@{max(ks)}", "click": "auc", "rating": "rmse"}[config.task]
