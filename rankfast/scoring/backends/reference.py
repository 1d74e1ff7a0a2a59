"""The reference backend: the model's own forward over every (user, candidate) pair of a tile."""

from __future__ import annotations

from torch import nn

from rankfast.models.base import RankingModel
from rankfast.scoring.protocol import Footprint, Scorer

__all__ = ["ReferenceScorer", "scorer_for"]


class ReferenceScorer(Scorer):
    """Expands a tile to aligned pairs and runs ``model(users, items, history, lengths)``:
    slow, but exact for every :class:`RankingModel`, which is what makes any model scorable."""

    def __init__(self, model: RankingModel, users, history=None, lengths=None, context=None):
        self.model, self.users, self.history, self.lengths = model, users, history, lengths
        self.context = context  # per user; models that read context fields only

    def items(self, ids):
        return ids

    def pairs(self, rows: slice, ids):
        users = self.users[rows]
        t, n = users.shape[0], ids.shape[-1]
        history = lengths = None
        if self.history is not None:
            history = self.history[rows, None].expand(t, n, -1).reshape(t * n, -1)
            lengths = self.lengths[rows, None].expand(t, n).reshape(-1)
        pair_users = users[:, None].expand(t, n).reshape(-1)
        pair_items = ids.expand(t, n).reshape(-1)
        if self.context is None:
            return self.model(pair_users, pair_items, history, lengths).view(t, n)
        context = {
            name: v[rows, None].expand(t, n, *v.shape[1:]).reshape(t * n, *v.shape[1:])
            for name, v in self.context.items()
        }
        return self.model(pair_users, pair_items, history, lengths, context=context).view(t, n)

    @staticmethod
    def footprint(model: RankingModel, history_len: int) -> Footprint:
        # Every layer's input and output per pair, once per history item: an
        # overestimate for attention's output MLP, which runs once per pair.
        widths = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        per_item = widths + 4 * model.config.dim
        return Footprint(user=history_len, item=1, pair=(history_len + 1) * per_item)


def scorer_for(model: RankingModel) -> type[Scorer]:
    return ReferenceScorer
