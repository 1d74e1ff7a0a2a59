import math

import numpy as np
import pytest
import torch

from rankfast import metrics
from rankfast.baselines import EASE
from rankfast.data import Interactions, temporal_split
from rankfast.evaluate import evaluate, evaluate_pointwise, evaluate_sampled


def _split(n_users=25, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(n_users):
        n = rng.integers(4, 20)
        users += [u] * n
        items += list(rng.choice(n_items, size=n, replace=False))
        stamps += list(rng.permutation(n))
    data = Interactions.from_raw(users, items, rng.integers(1, 6, size=len(users)), stamps)
    return temporal_split(data, 0.3)


def _brute_full_ranking(scores, train, test, k):
    """Dense scores, train items masked, stable sort (ties to the lower id), textbook metrics."""
    recalls, ndcgs = [], []
    for u in np.unique(test.users):
        s = scores[u].astype(np.float64).copy()
        s[train.items[train.users == u]] = -np.inf
        top = [int(i) for i in np.argsort(-s, kind="stable")[:k]]
        rel = set(test.items[test.users == u].tolist())
        hits = [i in rel for i in top]
        recalls.append(sum(hits) / min(len(rel), k))
        idcg = sum(1 / math.log2(p + 2) for p in range(min(len(rel), k)))
        ndcgs.append(sum(1 / math.log2(p + 2) for p, h in enumerate(hits) if h) / idcg)
    return np.mean(recalls), np.mean(ndcgs)


def test_full_ranking_matches_brute_force_and_is_batch_invariant():
    train, test = _split()
    model = EASE(train, lam=5.0)
    scores = model.score(np.arange(train.num_users)).numpy()
    for k in (3, 10):
        expected = _brute_full_ranking(scores, train, test, k)
        for batch_size in (1, 7, 1000):
            got = evaluate(model, train, test, ks=(k,), batch_size=batch_size, progress=False)
            assert (got[f"recall@{k}"], got[f"ndcg@{k}"]) == pytest.approx(expected)


def test_full_ranking_argument_errors():
    train, test = _split()
    other = Interactions.from_raw([0], [0])
    with pytest.raises(ValueError, match="test: must share train's id maps"):
        evaluate(EASE(train), train, other)
    with pytest.raises(ValueError, match="batch_size: must be at least 1"):
        evaluate(EASE(train), train, test, batch_size=0)
    with pytest.raises(ValueError, match="ks: expected positive"):
        evaluate(EASE(train), train, test, ks=(0,))


class _Table(torch.nn.Module):
    """Stand-in model: a fixed score table looked up per (user, item) pair."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, users, items, history=None, lengths=None):
        return self.table[users, items]


def test_sampled_ranking_counts_strictly_higher_and_drops_the_target():
    train = Interactions.from_raw([0, 1, 1], [0, 0, 1])
    maps = {"user_ids": train.user_ids, "item_ids": train.item_ids}
    table = np.array([[0.5, 0.9], [0.2, 0.2]])
    model = _Table(table)
    test = Interactions.from_raw([0, 1], [0, 0], **maps)
    # User 0: one negative (item 1) above; the negative equal to the target is dropped.
    # User 1: a tie with the target does not count.
    out = evaluate_sampled(model, train, test, negatives=np.array([[1, 0], [1, 1]]), ks=(1,))
    assert out["hr@1"] == 0.5 and out["mrr"] == pytest.approx(0.75)
    assert out["auc"] == pytest.approx(0.5)  # user 0: 0 of 1 below; user 1: 2 of 2
    with pytest.raises(ValueError, match=r"negatives: expected shape \(2, n\)"):
        evaluate_sampled(model, train, test, negatives=np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"negatives: id \d+ out of range \[0, 2\)"):
        evaluate_sampled(model, train, test, negatives=np.array([[2], [0]]))


def test_generated_negatives_exclude_train_and_test_items():
    train, test = _split(seed=2)
    rng = np.random.default_rng(0)
    table = rng.random((train.num_users, train.num_items))
    seen = np.zeros_like(table, dtype=bool)
    seen[train.users, train.items] = True
    seen[test.users, test.items] = True
    table[seen] = -1.0  # anything the sampler must avoid scores below every target...
    table[test.users, test.items] = 0.0  # ...and targets score below every true negative
    out = evaluate_sampled(_Table(table), train, test, num_negatives=5, ks=(5,), seed=3)
    assert out["hr@5"] == 0.0 and out["auc"] == 0.0


def test_pointwise_rating_and_click():
    train, test = _split(seed=5)
    rng = np.random.default_rng(1)
    table = rng.normal(size=(train.num_users, train.num_items))
    got = evaluate_pointwise(_Table(table), train, test, task="rating")
    pred = table[test.users, test.items].astype(np.float32)
    assert got["mae"] == pytest.approx(np.abs(pred - test.ratings).mean(), rel=1e-5)
    assert got["rmse"] == pytest.approx(np.sqrt(((pred - test.ratings) ** 2).mean()), rel=1e-5)
    clicks = Interactions(
        test.users, test.items, (test.ratings > 3).astype(np.float32), None, test.user_ids, test.item_ids
    )
    got = evaluate_pointwise(_Table(table), train, clicks, task="click")
    assert got["accuracy"] == pytest.approx(((pred >= 0) == (clicks.ratings > 0.5)).mean())
    assert 0.0 <= got["auc"] <= 1.0 and 0.0 <= got["gauc"] <= 1.0
    with pytest.raises(ValueError, match="task: expected 'rating' or 'click'"):
        evaluate_pointwise(_Table(table), train, test, task="ctr")


def _dense_forward_scores(model, num_users, num_items, history=None, lengths=None):
    users = torch.arange(num_users).repeat_interleave(num_items)
    items = torch.arange(num_items).repeat(num_users)
    h = None if history is None else torch.from_numpy(history).repeat_interleave(num_items, dim=0)
    n = None if lengths is None else torch.from_numpy(lengths).repeat_interleave(num_items)
    with torch.no_grad():
        return model.eval()(users, items, h, n).view(num_users, num_items).numpy()


def test_full_ranking_of_rankfast_models_through_score():
    from rankfast.data import user_histories
    from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel

    train, test = _split(seed=7)
    torch.manual_seed(0)
    dims = {"num_users": train.num_users, "num_items": train.num_items, "dim": 8}
    dot = DotModel(DotConfig(**dims))
    scores = _dense_forward_scores(dot, train.num_users, train.num_items)
    got = evaluate(dot, train, test, ks=(5,), batch_size=4, progress=False)
    assert (got["recall@5"], got["ndcg@5"]) == pytest.approx(_brute_full_ranking(scores, train, test, 5), rel=1e-6)

    attention = AttentionModel(AttentionConfig(**dims, hidden=(8,), unit_hidden=(4,)))
    history, lengths = user_histories(train, 3)
    scores = _dense_forward_scores(attention, train.num_users, train.num_items, history, lengths)
    got = evaluate(attention, train, test, ks=(5,), batch_size=4, max_history=3, progress=False)
    assert (got["recall@5"], got["ndcg@5"]) == pytest.approx(_brute_full_ranking(scores, train, test, 5), rel=1e-6)


def _sampled_pair_by_pair(pair_scores, test, negatives, ks):
    """The sampled protocol as evaluate_sampled used to run it: every (user, candidate) pair
    scored on its own by ``pair_scores(users, items)``."""
    candidates = np.concatenate([test.items[:, None], negatives], axis=1)
    users = np.repeat(test.users, candidates.shape[1])
    scores = np.asarray(pair_scores(users, candidates.reshape(-1)), dtype=np.float64).reshape(candidates.shape)
    valid = negatives != test.items[:, None]
    ranks = metrics.sampled_ranks(scores[:, 0], scores[:, 1:], valid)
    return metrics.rank_metrics(ranks, ks, num_negatives=valid.sum(axis=1))


def test_sampled_ranking_scores_each_user_once_as_pairs_would(monkeypatch):
    from rankfast.data import user_histories
    from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel

    train, test = _split(seed=4)  # several test rows per user
    negatives = np.random.default_rng(2).integers(0, train.num_items, size=(len(test), 7))
    ks = (1, 3, 5)

    ease = EASE(train, lam=3.0)
    want = _sampled_pair_by_pair(lambda u, i: ease(u, i).numpy(), test, negatives, ks)
    rows_scored = []
    whole_rows = EASE.score
    monkeypatch.setattr(EASE, "score", lambda self, users: rows_scored.append(len(users)) or whole_rows(self, users))
    assert evaluate_sampled(ease, train, test, negatives, ks=ks) == pytest.approx(want)
    assert rows_scored == [len(np.unique(test.users))]  # one row per distinct user, one call
    assert evaluate_sampled(ease, train, test, negatives, ks=ks, batch_size=3) == pytest.approx(want)

    torch.manual_seed(0)
    dims = {"num_users": train.num_users, "num_items": train.num_items, "dim": 8}
    history, lengths = (torch.from_numpy(a) for a in user_histories(train, 3))
    for model in (
        DotModel(DotConfig(**dims)).double(),
        AttentionModel(AttentionConfig(**dims, hidden=(8,), unit_hidden=(4,))).double().eval(),
    ):

        def pairs(u, i, model=model):
            u, i = torch.from_numpy(u), torch.from_numpy(i)
            with torch.no_grad():
                return model(u, i, history[u], lengths[u]).numpy()

        want = _sampled_pair_by_pair(pairs, test, negatives, ks)
        for batch_size in (1024, 5):
            got = evaluate_sampled(model, train, test, negatives, ks=ks, max_history=3, batch_size=batch_size)
            assert got == pytest.approx(want), type(model).__name__
