"""What a training step ranks each interaction against: one strategy per ``TrainConfig.negatives``.

A strategy owns an epoch's micro-batches (a function of seed, epoch and rank
only, so a resumed run repeats them), the module the step runs (the model,
or a wrapper scoring users against many items at once, which
DistributedDataParallel wraps) and the loss of one micro-batch:

- :class:`SampledNegatives` (``"uniform"``, ``"popularity"``): each
  interaction against ``num_negatives`` drawn items (``bce``, ``bpr``, the
  logQ-corrected sampled softmax), or alone for the rating regression (``mse``);
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
from torch import nn

from rankfast.data import Interactions, NegativeSampler, event_histories, sequence_windows
from rankfast.models import SASRec
from rankfast.train.catalogue import CatalogueScores, SequenceScores
from rankfast.train.distributed import DistContext, shard
from rankfast.train.fused import FusedScores
from rankfast.train.losses import bce_loss, bpr_loss, full_softmax_loss, mse_loss, sampled_softmax_loss
from rankfast.train.multitask import MultiTask

__all__ = ["Examples", "FullSoftmax", "NextItem", "Partition", "SampledNegatives", "Strategy", "strategy_for"]


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
    ``fused``: score through the fused kernels (:class:`FusedScores`).
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
        fused: bool,
    ):
        self.model, self.data, self.examples, self.config = model, data, examples, config
        self.context, self.device, self.fused = context, device, fused

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

    def _batched(self, order: np.ndarray, extra=None) -> list:
        size = self.config.batch_size
        return [
            (torch.from_numpy(order[s : s + size]), None if extra is None else extra[s : s + size])
            for s in range(0, len(order), size)
        ]


class SampledNegatives(Strategy):
    """Each interaction against ``num_negatives`` items its user never interacted with,
    drawn by ``negatives`` (uniform or count ** ``negative_alpha``); no negatives for ``mse``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = self.log_q = None
        if self.config.loss != "mse":
            self.sampler, self.log_q = _negative_sampler(self.data, self.config)

    def module(self):
        return FusedScores(self.model) if self.fused else self.model

    def num_micro_batches(self):
        return -(-len(shard(np.arange(len(self.examples)), self.context)) // self.config.batch_size)

    def micro_batches(self, epoch):
        order = self._shuffled(epoch)
        negatives = None
        if self.sampler is not None:
            rng = np.random.default_rng([self.config.seed, epoch, self.context.rank, 1])
            negatives = torch.from_numpy(self.sampler.sample(self.data.users[order], self.config.num_negatives, rng))
        return self._batched(order, negatives)

    def loss(self, net, idx, negatives):
        ex, config = self.examples, self.config
        users, items = ex.users[idx], ex.items[idx][:, None]
        history = None if ex.history is None else ex.history[idx]
        lengths = None if ex.lengths is None else ex.lengths[idx]
        if negatives is not None:
            items = torch.cat([items, negatives], dim=1)  # [B, 1 + negatives]: the positive first
        if not self.fused:  # the model's forward takes aligned (user, item) pairs
            width = items.shape[1]
            items, users = items.reshape(-1), users.repeat_interleave(width)
            if history is not None:
                history, lengths = history.repeat_interleave(width, dim=0), lengths.repeat_interleave(width)
        with self._autocast():
            out = net(*(self._to_device(t) for t in (users, items, history, lengths)))
        multitask = isinstance(self.model, MultiTask)
        clicks, ratings = out if multitask else (out, None)
        scores = clicks.float().view(len(idx), -1)
        if config.loss == "mse":
            return mse_loss(scores[:, 0], self._to_device(ex.ratings[idx]))
        loss = _ranking_loss(config.loss, scores, items.view(len(idx), -1), self.log_q, self.device)
        if multitask:
            rating_loss = mse_loss(ratings.float().view(len(idx), -1)[:, 0], self._to_device(ex.ratings[idx]))
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


class FullSoftmax(Strategy):
    """Each interaction against every item: each distinct user of a micro-batch is scored
    against the catalogue once, and that row serves all its interactions."""

    def module(self):
        return FusedScores(self.model) if self.fused else CatalogueScores(self.model)

    def num_micro_batches(self):
        return -(-len(shard(np.arange(len(self.examples)), self.context)) // self.config.batch_size)

    def micro_batches(self, epoch):
        return self._batched(self._shuffled(epoch))

    def loss(self, net, idx, extra):
        rows, inverse = torch.unique(self.examples.users[idx], return_inverse=True)
        with self._autocast():
            logits = net(rows.to(self.device))
        return full_softmax_loss(logits.float(), inverse.to(self.device), self.examples.items[idx].to(self.device))


class Partition(Strategy):
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


def strategy_for(negatives: str, model=None) -> type[Strategy]:
    """The strategy class of a ``TrainConfig.negatives`` value (for ``model``: a sequence
    model trains by :class:`NextItem` whatever the negatives, ``"partition"`` excepted)."""
    if isinstance(model, SASRec):
        if negatives == "partition":
            raise ValueError(
                "negatives: 'partition' does not train SASRec; use 'all' (the full softmax) or sampled negatives"
            )
        return NextItem
    return {"all": FullSoftmax, "partition": Partition}.get(negatives, SampledNegatives)
