"""What a training step ranks each interaction against: one strategy per ``TrainConfig.negatives``.

A strategy owns an epoch's micro-batches (a function of seed, epoch and rank
only, so a resumed run repeats them), the module the step runs (the model,
or a wrapper scoring users against many items at once, which
DistributedDataParallel wraps) and the loss of one micro-batch:

- :class:`SampledNegatives` (``"uniform"``, ``"popularity"``): each
  interaction against ``num_negatives`` drawn items (``bce``, ``bpr``, the
  logQ-corrected sampled softmax);
- :class:`Pointwise` (tasks ``click`` and ``rating``): each labelled row alone
  (log-loss on 0/1 labels, MSE on ratings, cross-entropy over rating classes),
  plus sampled negatives labelled 0 for click data with positives only when
  ``negatives`` asks for them;
- :class:`FullSoftmax` (``"all"``): each interaction against every item;
- :class:`Partition` (``"partition"``): the full softmax over random parts of
  the catalogue, a micro-batch being one part with its items' interactions;
- :class:`NextItem` (any of them but ``"partition"``, for :class:`SASRec`):
  windows of users' item sequences, one causal pass giving the user vector
  before each item, each interaction ranked against every item (``"all"``)
  or against sampled negatives.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankfast.data import Interactions, NegativeSampler, event_histories, sequence_windows
from rankfast.models import RecommenderNet, SASRec
from rankfast.train.candidates import CandidateScores
from rankfast.train.catalogue import CatalogueScores, SequenceScores
from rankfast.train.distributed import DistContext, shard
from rankfast.train.losses import bce_loss, bpr_loss, full_softmax_loss, mse_loss, sampled_softmax_loss
from rankfast.train.multitask import MultiTask

__all__ = [
    "Examples",
    "FullSoftmax",
    "NextItem",
    "Partition",
    "Pointwise",
    "SampledNegatives",
    "Strategy",
    "strategy_for",
]


class Examples:
    """The training interactions as tensors, with each event's history when the model reads them."""

    def __init__(self, data: Interactions, max_history: int, uses_history: bool):
        self.users = torch.from_numpy(data.users)
        self.items = torch.from_numpy(data.items)
        self.ratings = None if data.ratings is None else torch.from_numpy(data.ratings)
        self.history = self.lengths = None
        if uses_history:
            history, lengths = event_histories(data, max_history)
            self.history, self.lengths = torch.from_numpy(history), torch.from_numpy(lengths)

    def __len__(self):
        return len(self.users)


class Strategy:
    """How micro-batches are formed and scored (see the module docstring).

    ``model`` is what trains (a :class:`RankingModel` or :class:`MultiTask`);
    ``backend``: score each user against its candidates through that scoring
    backend (:class:`CandidateScores`: ``"fused"`` or ``"factorized"``), or
    None for the model's own forward.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Interactions,
        examples: Examples,
        config,
        context: DistContext,
        device: torch.device,
        *,
        backend: str | None,
    ):
        self.model, self.data, self.examples, self.config = model, data, examples, config
        self.context, self.device, self.backend = context, device, backend
        ranker = model.base if isinstance(model, MultiTask) else model
        #: The interactions' context fields (encoded tensors) for models that read them, else None.
        self.impressions = field_context(ranker, data)
        if self.impressions is not None and isinstance(model, MultiTask):
            raise ValueError(f"model: a MultiTask model cannot take the context fields {type(ranker).__name__} reads")
        if config.task == "ranking" and data.ratings is not None:
            zeros = np.flatnonzero(data.ratings == 0)
            if zeros.size and np.isin(data.ratings, (0.0, 1.0)).all():
                raise ValueError(
                    f"train: row {zeros[0]} (and {zeros.size - 1} more) is labelled 0, and task 'ranking' trains every "
                    "row as a positive; use task='click' (point-wise log-loss on the labels) or drop those rows"
                )

    def module(self) -> nn.Module:
        """The module a step calls (and DistributedDataParallel wraps)."""
        raise NotImplementedError

    def num_micro_batches(self) -> int:
        """Micro-batches this rank runs each epoch."""
        raise NotImplementedError

    def micro_batches(self, epoch: int) -> list:
        """This rank's micro-batches of ``epoch``: ``(example indices, extra)`` pairs."""
        raise NotImplementedError

    def loss(self, net: nn.Module, idx: torch.Tensor, extra) -> torch.Tensor:
        """The loss of one micro-batch, scored through ``net`` (the wrapped :meth:`module`)."""
        raise NotImplementedError

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _to_device(self, t):
        return None if t is None else t.to(self.device, non_blocking=True)

    def _shuffled(self, epoch: int) -> np.ndarray:
        """This rank's share of the examples in the epoch's order."""
        return shard(np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples)), self.context)

    def _impressions(self, idx: torch.Tensor, width: int = 1):
        """``{"context": ...}`` of rows ``idx`` (each repeated ``width`` times) for models that read
        context fields, else ``{}``: the keyword arguments a forward takes."""
        if self.impressions is None:
            return {}
        rows = {k: v[idx] for k, v in self.impressions.items()}
        if width > 1:
            rows = {k: v.repeat_interleave(width, dim=0) for k, v in rows.items()}
        return {"context": {k: self._to_device(v) for k, v in rows.items()}}

    def _batched(self, order: np.ndarray, extra=None) -> list:
        size = self.config.batch_size
        return [
            (torch.from_numpy(order[s : s + size]), None if extra is None else extra[s : s + size])
            for s in range(0, len(order), size)
        ]


class SampledNegatives(Strategy):
    """Each interaction against ``num_negatives`` items its user never interacted with,
    drawn by ``negatives`` (uniform or count ** ``negative_alpha``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = self.log_q = None
        if self.config.negatives in ("uniform", "popularity"):
            self.sampler, self.log_q = _negative_sampler(self.data, self.config)

    def module(self):
        return self.model if self.backend is None else CandidateScores(self.model, self.backend)

    def num_micro_batches(self):
        return -(-len(shard(np.arange(len(self.examples)), self.context)) // self.config.batch_size)

    def micro_batches(self, epoch):
        order = self._shuffled(epoch)
        negatives = None
        if self.sampler is not None:
            rng = np.random.default_rng([self.config.seed, epoch, self.context.rank, 1])
            negatives = torch.from_numpy(self.sampler.sample(self.data.users[order], self.config.num_negatives, rng))
        return self._batched(order, negatives)

    def _scores(self, net, idx, negatives):
        """``(items [B, W], out)``: each row's item (then its negatives) and ``net``'s output on
        them, ``[B * W]`` (a tuple for a :class:`MultiTask`)."""
        ex = self.examples
        users, items = ex.users[idx], ex.items[idx][:, None]
        history = None if ex.history is None else ex.history[idx]
        lengths = None if ex.lengths is None else ex.lengths[idx]
        if negatives is not None:
            items = torch.cat([items, negatives], dim=1)  # [B, 1 + negatives]: the positive first
        width = items.shape[1]
        pair_items = items
        if self.backend is None:  # the model's forward takes aligned (user, item) pairs
            pair_items = items.reshape(-1)
            if width > 1:
                users = users.repeat_interleave(width)
                if history is not None:
                    history, lengths = history.repeat_interleave(width, dim=0), lengths.repeat_interleave(width)
        # A MultiTask rates the positives only: the first of each row's pairs.
        rated = {}
        if isinstance(self.model, MultiTask):
            rated = {"rated": torch.arange(0, len(idx) * width, width, device=self.device)}
        with self._autocast():
            out = net(
                *(self._to_device(t) for t in (users, pair_items, history, lengths)),
                **self._impressions(idx, width),
                **rated,
            )
        return items, out

    def loss(self, net, idx, negatives):
        items, out = self._scores(net, idx, negatives)
        multitask = isinstance(self.model, MultiTask)
        clicks, ratings = out if multitask else (out, None)
        scores = clicks.float().view(len(idx), -1)
        loss = _ranking_loss(self.config.loss, scores, items.view(len(idx), -1), self.log_q, self.device)
        if multitask:
            rating_loss = self.model.rating_loss(ratings.float(), self._to_device(self.examples.ratings[idx]))
            loss = self.model.click_weight * loss + self.model.rating_weight * rating_loss
        return loss


def _negative_sampler(data: Interactions, config) -> tuple[NegativeSampler, torch.Tensor]:
    """The sampler of ``config.negatives`` and the log of its probabilities (for logQ)."""
    sampler = NegativeSampler(data, distribution=config.negatives, alpha=config.negative_alpha)
    return sampler, torch.from_numpy(np.log(np.maximum(sampler.probs, 1e-30))).float()


def _ranking_loss(loss: str, scores: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor, device) -> torch.Tensor:
    """``bce``, ``bpr`` or the logQ-corrected sampled softmax of ``scores [B, 1 + n]`` of
    ``items [B, 1 + n]`` (the positive first)."""
    pos, neg = scores[:, 0], scores[:, 1:]
    if loss == "bce":
        return bce_loss(pos, neg)
    if loss == "bpr":
        return bpr_loss(pos, neg)
    log_q = log_q[items].to(device)
    return sampled_softmax_loss(pos, neg, log_q[:, 0], log_q[:, 1:])


class _ClassLogits(nn.Module):
    """``forward -> model.class_logits``: the module a cross-entropy step runs (and DDP wraps)."""

    def __init__(self, model: RecommenderNet):
        super().__init__()
        self.model = model

    def forward(self, users, items, history=None, lengths=None):
        return self.model.class_logits(users, items, history, lengths)


class Pointwise(SampledNegatives):
    """Labelled rows, one score each (tasks ``click`` and ``rating``, :mod:`rankfast.train.tasks`):
    log-loss on 0/1 labels, MSE on ratings, or cross-entropy over a :class:`RecommenderNet`'s
    rating classes. Click data with positives only (no labels, or all 1) gets
    ``num_negatives`` sampled items a row, labelled 0, when ``negatives`` asks for them."""

    def __init__(self, model, data, examples, config, *args, **kwargs):
        ratings = data.ratings
        if config.task == "click":
            if ratings is not None:
                bad = np.flatnonzero((ratings != 0) & (ratings != 1))
                if bad.size:
                    raise ValueError(
                        f"train: row {bad[0]}: label {ratings[bad[0]]} is not 0 or 1 (task 'click' needs 0/1 "
                        "labels: e.g. data.clicks(threshold) for click = rating >= threshold)"
                    )
            positives_only = ratings is None or bool((ratings == 1).all())
            if positives_only and config.negatives == "none":
                raise ValueError(
                    "train: every row is a positive (no 0 labels), so log-loss has nothing to tell apart; set "
                    "negatives='uniform' or 'popularity' to draw num_negatives items a row labelled 0"
                )
            if not positives_only and config.negatives != "none":
                raise ValueError(
                    f"negatives: {config.negatives!r} samples negatives, and the data has its own (rows labelled 0); "
                    "labelled rows train on exactly those rows (negatives='none')"
                )
        if config.loss == "ce" and not isinstance(model, RecommenderNet):
            raise ValueError(
                f"loss: 'ce' (cross-entropy over rating classes) needs a RecommenderNet, got {type(model).__name__}"
            )
        super().__init__(model, data, examples, config, *args, **kwargs)
        self.labels = None if ratings is None else torch.from_numpy(ratings)
        if config.loss == "ce":
            self.labels = model.class_index(self.labels, where="train")

    def module(self):
        if self.config.loss == "ce":
            return _ClassLogits(self.model)
        return super().module()

    def loss(self, net, idx, negatives):
        _, out = self._scores(net, idx, negatives)
        if self.config.loss == "ce":
            return F.cross_entropy(out.float(), self._to_device(self.labels[idx]))
        scores = out.float().view(len(idx), -1)
        if self.config.loss == "mse":
            return mse_loss(scores[:, 0], self._to_device(self.labels[idx]))
        if negatives is None:
            return F.binary_cross_entropy_with_logits(scores[:, 0], self._to_device(self.labels[idx]))
        labels = torch.zeros_like(scores)  # each row's item, then its sampled negatives
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(scores, labels)


class _Catalogue(Strategy):
    """Strategies that score users against many items at once: a user's score row is shared by
    interactions with different contexts, so a model reading context fields cannot use them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.impressions is not None:
            names = [f.name for f in self.model.context_fields]
            raise ValueError(
                f"negatives: {self.config.negatives!r} (full softmax) needs a model without context fields; "
                f"{type(self.model).__name__} reads {names} (use sampled negatives)"
            )


class FullSoftmax(_Catalogue):
    """Each interaction against every item: each distinct user of a micro-batch is scored
    against the catalogue once, and that row serves all its interactions."""

    def module(self):
        return CatalogueScores(self.model) if self.backend is None else CandidateScores(self.model, self.backend)

    def num_micro_batches(self):
        return -(-len(shard(np.arange(len(self.examples)), self.context)) // self.config.batch_size)

    def micro_batches(self, epoch):
        return self._batched(self._shuffled(epoch))

    def loss(self, net, idx, extra):
        rows, inverse = torch.unique(self.examples.users[idx], return_inverse=True)
        with self._autocast():
            logits = net(rows.to(self.device))
        return full_softmax_loss(logits.float(), inverse.to(self.device), self.examples.items[idx].to(self.device))


class Partition(_Catalogue):
    """The full softmax over random parts of ``num_negatives`` items: each epoch the catalogue
    is shuffled and cut into parts, and a micro-batch is one part (sorted) with the indices of
    its items' interactions, each user's softmax running over that part alone."""

    def module(self):
        return CatalogueScores(self.model)

    def _num_parts(self) -> int:
        return -(-self.data.num_items // int(self.config.num_negatives))

    def num_micro_batches(self):
        return len(shard(np.arange(self._num_parts()), self.context))

    def micro_batches(self, epoch):
        size, num_items = int(self.config.num_negatives), self.data.num_items
        items = np.random.default_rng([self.config.seed, epoch]).permutation(num_items)
        part_of = np.empty(num_items, dtype=np.int64)
        part_of[items] = np.arange(num_items) // size
        example_part = part_of[self.data.items]
        order = np.argsort(example_part, kind="stable")
        bounds = np.searchsorted(example_part[order], np.arange(self._num_parts() + 1))
        batches = []
        for part in shard(np.arange(self._num_parts()), self.context):
            members = np.sort(items[part * size : (part + 1) * size])
            batches.append((torch.from_numpy(order[bounds[part] : bounds[part + 1]]), torch.from_numpy(members)))
        return batches

    def loss(self, net, idx, members):
        rows, inverse = torch.unique(self.examples.users[idx], return_inverse=True)
        targets = torch.searchsorted(members, self.examples.items[idx])
        with self._autocast():
            logits = net(rows.to(self.device), members.to(self.device))
        if not len(idx):  # no interaction in this part: a zero loss that still runs the model (DDP)
            return logits.float().sum() * 0.0
        return full_softmax_loss(logits.float(), inverse.to(self.device), targets.to(self.device))


class NextItem(Strategy):
    """Next-item training of a sequence model (:class:`SASRec`): each user's items in time
    order are cut into windows of ``min(model.config.max_len, config.max_history)`` items
    (:func:`rankfast.data.sequence_windows`), and one causal pass over a window gives the user
    vector before each of its items, which is ranked against every item (``negatives="all"``,
    the full softmax) or against ``num_negatives`` sampled ones (``bce``, ``bpr``, the
    logQ-corrected sampled softmax). Every interaction but a user's first is a target once an
    epoch; its history is the user's earlier items in its window, as the model's ``forward``
    would read them. A micro-batch is a fixed number of windows, chosen so that micro-batches
    hold about ``batch_size`` targets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.loss == "mse":
            raise ValueError(f"loss: {type(self.model).__name__} trains on next-item targets; 'mse' does not apply")
        length = min(self.model.config.max_len, self.config.max_history)
        windows = sequence_windows(self.data, length)
        self.windows, self.lengths, self.targets, self.users, _ = (torch.from_numpy(a) for a in windows)
        self.sampler = self.log_q = None
        if self.config.negatives != "all":
            self.sampler, self.log_q = _negative_sampler(self.data, self.config)
        num_targets = int((self.targets >= 0).sum())
        self.per_batch = max(1, round(self.config.batch_size * len(self.windows) / max(num_targets, 1)))

    def module(self):
        return SequenceScores(self.model)

    def num_micro_batches(self):
        return -(-len(shard(np.arange(len(self.windows)), self.context)) // self.per_batch)

    def micro_batches(self, epoch):
        order = shard(np.random.default_rng([self.config.seed, epoch]).permutation(len(self.windows)), self.context)
        rng = np.random.default_rng([self.config.seed, epoch, self.context.rank, 1])
        batches = []
        for s in range(0, len(order), self.per_batch):
            idx = torch.from_numpy(order[s : s + self.per_batch])
            negatives = None
            if self.sampler is not None:  # for each target, in row-major order of the windows' positions
                counts = (self.targets[idx] >= 0).sum(1)
                owners = self.users[idx].repeat_interleave(counts).numpy()
                negatives = torch.from_numpy(self.sampler.sample(owners, self.config.num_negatives, rng))
            batches.append((idx, negatives))
        return batches

    def loss(self, net, idx, negatives):
        targets = self.targets[idx]
        select = targets >= 0
        positives = targets[select]
        items = None if negatives is None else torch.cat([positives[:, None], negatives], dim=1)
        args = (self.windows[idx], self.lengths[idx], select, items)
        with self._autocast():
            scores = net(*(self._to_device(t) for t in args)).float()
        if items is None:
            rows = torch.arange(len(positives), device=self.device)
            return full_softmax_loss(scores, rows, positives.to(self.device))
        return _ranking_loss(self.config.loss, scores, items, self.log_q, self.device)


def strategy_for(config, model=None) -> type[Strategy]:
    """The strategy class of a :class:`TrainConfig` (and ``model``): :class:`NextItem` for a
    sequence model (:class:`SASRec`, whatever the negatives but ``"partition"``),
    :class:`Pointwise` for the tasks ``click`` and ``rating``, else the one of its ``negatives``."""
    if isinstance(model, SASRec):
        if config.negatives == "partition":
            raise ValueError(
                "negatives: 'partition' does not train SASRec; use 'all' (the full softmax) or sampled negatives"
            )
        return NextItem
    if config.task != "ranking":
        return Pointwise
    return {"all": FullSoftmax, "partition": Partition}.get(config.negatives, SampledNegatives)


def field_context(model, data: Interactions) -> dict[str, torch.Tensor] | None:
    """The context fields of ``data``'s rows that ``model`` reads (None for models without
    context fields), after checking that ``data`` has the model's fields encoded as the model
    encodes them (same vocabularies) and the same user and item tables (a ``ValueError``
    naming the field and the first row that differs)."""
    fields = tuple(getattr(model.config, "fields", ()))
    if not fields:
        return None
    if data.features is None:
        raise ValueError(
            f"train: the model reads the feature fields {[f.name for f in fields]}, and the data has no features"
        )
    features = data.features.select(fields)
    for side in ("user", "item"):
        for f in features.schema.side(side):
            mine = getattr(getattr(model, f"{side}_repr").tables, f.name).cpu().numpy()
            theirs = getattr(features, side).values[f.name]
            differs = np.flatnonzero(
                (~np.isclose(mine.reshape(len(mine), -1), theirs.reshape(len(theirs), -1))).any(axis=1)
            )
            if differs.size:
                raise ValueError(
                    f"train: field {f.name!r}: the model's {side} table differs from the data's at {side} "
                    f"{differs[0]} (build the model with features=data.features)"
                )
    if not model.uses_context:
        return None
    return features.context.tensors()
