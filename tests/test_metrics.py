import math

import numpy as np
import pytest
import torch

from rankfast import metrics


def _brute(ranked_row, relevant_row, k):
    """Textbook per-user definitions, one row at a time."""
    rel = set(int(i) for i in relevant_row)
    top = [int(i) for i in ranked_row[:k]]
    seen, hits = set(), []
    for i in top:
        hits.append(i in rel and i not in seen)
        seen.add(i)
    n_hit = sum(hits)
    denom = min(len(rel), k)
    dcg = sum(1 / math.log2(p + 2) for p, h in enumerate(hits) if h)
    idcg = sum(1 / math.log2(p + 2) for p in range(denom))
    ap, running = 0.0, 0
    for p, h in enumerate(hits):
        if h:
            running += 1
            ap += running / (p + 1)
    first = next((p for p, h in enumerate(hits) if h), None)
    return {
        "hr": float(n_hit > 0),
        "recall": n_hit / denom,
        "precision": n_hit / k,
        "ndcg": dcg / idcg,
        "map": ap / denom,
        "rr": 0.0 if first is None else 1 / (first + 1),
    }


def test_hand_computed_case():
    ranked = np.array([[3, 1, 2, -1]])
    relevant = [[1, 2, 5]]
    assert metrics.hit_rate(ranked, relevant, 3)[0] == 1.0
    assert metrics.recall(ranked, relevant, 3)[0] == pytest.approx(2 / 3)
    assert metrics.precision(ranked, relevant, 3)[0] == pytest.approx(2 / 3)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics.ndcg(ranked, relevant, 3)[0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / ideal)
    assert metrics.reciprocal_rank(ranked, relevant)[0] == pytest.approx(0.5)
    assert metrics.average_precision(ranked, relevant, 3)[0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    # Recall divides by min(|relevant|, K): one relevant item found at K=1 is perfect.
    assert metrics.recall(np.array([[1]]), [[1, 2, 5]], 1)[0] == 1.0
    assert metrics.hit_rate(np.array([[3, 4]]), [[1]], 2)[0] == 0.0


def test_matches_brute_force_on_random_lists():
    rng = np.random.default_rng(0)
    rows, width, n_items = 60, 12, 30
    ranked = np.stack([rng.permutation(n_items)[:width] for _ in range(rows)])
    ranked[rng.random(ranked.shape) < 0.1] = -1  # padding
    relevant = [rng.choice(n_items, size=rng.integers(1, 15), replace=False) for _ in range(rows)]
    fns = {
        "hr": metrics.hit_rate,
        "recall": metrics.recall,
        "precision": metrics.precision,
        "ndcg": metrics.ndcg,
        "map": metrics.average_precision,
    }
    for k in (1, 5, 12):
        expected = [_brute(ranked[r], relevant[r], k) for r in range(rows)]
        for name, fn in fns.items():
            np.testing.assert_allclose(
                fn(ranked, relevant, k), [e[name] for e in expected], rtol=1e-12, err_msg=f"{name}@{k}"
            )
        np.testing.assert_allclose(metrics.reciprocal_rank(ranked, relevant, k), [e["rr"] for e in expected])
    # CSR input gives the same as lists; torch input as numpy.
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in relevant])])
    csr = (indptr, np.concatenate(relevant))
    np.testing.assert_allclose(metrics.ndcg(torch.from_numpy(ranked), csr, 5), metrics.ndcg(ranked, relevant, 5))
    summary = metrics.ranking_metrics(ranked, relevant, ks=(5,))
    assert summary["ndcg@5"] == pytest.approx(np.mean([_brute(ranked[r], relevant[r], 5)["ndcg"] for r in range(rows)]))
    assert set(summary) == {"hr@5", "recall@5", "precision@5", "ndcg@5", "map@5", "mrr"}


def test_ndcg_against_graded_formula_with_sorted_ideal():
    """NDCG through an independent route: gains vector over all items, ideal from sorting."""
    rng = np.random.default_rng(1)
    n_items, k = 20, 7
    for _ in range(20):
        scores = rng.random(n_items)
        relevant = rng.choice(n_items, size=rng.integers(1, 10), replace=False)
        gains = np.zeros(n_items)
        gains[relevant] = 1
        order = np.argsort(-scores)
        disc = 1 / np.log2(np.arange(2, k + 2))
        expected = (gains[order][:k] * disc).sum() / (np.sort(gains)[::-1][:k] * disc).sum()
        assert metrics.ndcg(order[None, :k], [relevant], k)[0] == pytest.approx(expected)


def test_duplicates_and_empty_rows():
    # A repeated id is counted once; a row without relevant items is NaN and ignored by the summary.
    assert metrics.precision(np.array([[1, 1]]), [[1]], 2)[0] == 0.5
    values = metrics.recall(np.array([[1, 2], [1, 2]]), [[1], []], 2)
    assert values[0] == 1.0 and np.isnan(values[1])
    assert metrics.ranking_metrics(np.array([[1, 2], [1, 2]]), [[1], []], ks=(2,))["recall@2"] == 1.0


def test_argument_errors():
    with pytest.raises(ValueError, match="k: 5 exceeds"):
        metrics.recall(np.zeros((1, 3), dtype=np.int64), [[0]], 5)
    with pytest.raises(ValueError, match="k: must be at least 1"):
        metrics.ndcg(np.zeros((1, 3), dtype=np.int64), [[0]], 0)
    with pytest.raises(ValueError, match="relevant: 2 rows"):
        metrics.recall(np.zeros((1, 3), dtype=np.int64), [[0], [1]], 2)
    with pytest.raises(ValueError, match="ranked: expected a 2-D integer"):
        metrics.recall(np.zeros((1, 3)), [[0]], 2)
    with pytest.raises(ValueError, match="labels: length"):
        metrics.auc([0.1, 0.2], [1])


def _brute_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auc_and_gauc_against_pairwise_counts():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, size=200).astype(float)  # many ties
    labels = (rng.random(200) < 0.4).astype(int)
    assert metrics.auc(scores, labels) == pytest.approx(_brute_auc(scores, labels))
    assert metrics.auc([0.9, 0.1, 0.5], [1, 0, 0]) == 1.0
    assert metrics.auc([0.1, 0.9], [1, 0]) == 0.0
    assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))
    groups = rng.integers(0, 8, size=200)
    groups[groups == 7] = 6
    labels[groups == 6] = 1  # group 6 has one class: skipped
    expected_num, expected_den = 0.0, 0
    for g in range(6):
        m = groups == g
        expected_num += _brute_auc(scores[m], labels[m]) * m.sum()
        expected_den += m.sum()
    assert metrics.gauc(scores, labels, groups) == pytest.approx(expected_num / expected_den)


def test_sampled_ranks_rules():
    target = np.array([0.5, 0.5, np.nan, 0.2])
    negatives = np.array(
        [
            [0.9, 0.5, 0.1],  # one strictly higher; the tie does not count
            [0.9, 0.8, 0.1],  # the 0.9 is the target item itself: dropped
            [0.1, np.nan, -5.0],  # NaN target ranks below every number
            [np.nan, 0.1, 0.3],  # a NaN negative ranks last
        ]
    )
    valid = np.ones_like(negatives, dtype=bool)
    valid[1, 0] = False
    ranks = metrics.sampled_ranks(target, negatives, valid)
    np.testing.assert_array_equal(ranks, [1, 1, 2, 1])
    out = metrics.rank_metrics(ranks, ks=(1, 2), num_negatives=valid.sum(axis=1))
    assert out["hr@1"] == 0.0 and out["hr@2"] == 0.75
    assert out["ndcg@2"] == pytest.approx(0.75 / math.log2(3))
    assert out["mrr"] == pytest.approx((0.5 * 3 + 1 / 3) / 4)
    assert out["auc"] == pytest.approx(np.mean([2 / 3, 1 / 2, 1 / 3, 2 / 3]))


def test_pointwise_metrics():
    pred, target = np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 1.0])
    assert metrics.mae(pred, target) == pytest.approx(4 / 3)
    assert metrics.rmse(pred, target) == pytest.approx(math.sqrt(10 / 3))
    assert metrics.accuracy([0.7, 0.2, 0.5, 0.1], [1, 1, 0, 0]) == 0.5
    assert metrics.accuracy(torch.tensor([1.5, -0.3]), [1, 0], threshold=0.0) == 1.0
    with pytest.raises(ValueError, match="predictions: empty"):
        metrics.mae([], [])


def test_auc_and_ndcg_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 20, 500).astype(np.float64)  # many ties: both count them 1/2
    labels = (rng.random(500) < 0.3).astype(np.float64)
    assert metrics.auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)

    users, items, k = 40, 60, 10
    score_matrix = rng.standard_normal((users, items))  # continuous: no ties in the ranking
    relevance = rng.random((users, items)) < 0.1
    relevance[np.arange(users), rng.integers(0, items, users)] = True  # every user has a relevant item
    ranked = np.argsort(-score_matrix, axis=1)[:, :k]
    relevant = [np.flatnonzero(row) for row in relevance]
    ours = metrics.ndcg(ranked, relevant, k).mean()
    assert ours == pytest.approx(sklearn_metrics.ndcg_score(relevance.astype(float), score_matrix, k=k), abs=1e-12)
