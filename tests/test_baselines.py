import numpy as np
import pytest
import torch

from rankfast.baselines import EASE, Popularity
from rankfast.data import Interactions, temporal_split
from rankfast.evaluate import evaluate


def _random_data(n_users, n_items, density=0.3, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < density
    users, items = np.nonzero(mask)
    # Every id present, so the maps are the identity.
    users = np.concatenate([users, np.arange(n_users), np.zeros(n_items, dtype=np.int64)])
    items = np.concatenate([items, np.zeros(n_users, dtype=np.int64), np.arange(n_items)])
    return Interactions.from_raw(users, items)


def _ease_reference(data, lam, history=None):
    x = np.zeros((data.num_users, data.num_items))
    x[data.users, data.items] = 1.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(data.num_items))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return (x if history is None else history) @ b


@pytest.mark.parametrize("n_users, n_items", [(40, 15), (15, 40)])  # primal and dual (Woodbury) forms
def test_ease_matches_closed_form(n_users, n_items):
    data = _random_data(n_users, n_items)
    model = EASE(data, lam=3.0)
    expected = _ease_reference(data, 3.0)
    users = np.array([0, 3, 7, 3])
    np.testing.assert_allclose(model.score(users).numpy(), expected[users], rtol=1e-4, atol=1e-5)
    items = np.array([1, 0, 14, 5])
    np.testing.assert_allclose(model(users, items).numpy(), expected[users, items], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="lam: must be positive"):
        EASE(data, lam=0)


@pytest.mark.parametrize("n_users, n_items", [(40, 15), (15, 40)])
def test_ease_scores_a_given_history_with_weights_fitted_on_the_binary_rows(n_users, n_items):
    data = _random_data(n_users, n_items, seed=2)
    history = np.random.default_rng(3).random((n_users, n_items))  # any real rows, not only X's
    model = EASE(data, lam=3.0, history=torch.from_numpy(history).float())
    expected = _ease_reference(data, 3.0, history)
    users = np.array([1, 0, 9, 1])
    np.testing.assert_allclose(model.score(users).numpy(), expected[users], rtol=1e-4, atol=1e-5)
    items = np.array([2, 0, 14, 5])
    np.testing.assert_allclose(model(users, items).numpy(), expected[users, items], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"history: expected shape"):
        EASE(data, history=torch.zeros(n_users, n_items + 1))
    for bad in (torch.zeros(n_users, n_items, dtype=torch.int64), history):
        with pytest.raises(TypeError, match="history: expected a floating-point tensor"):
            EASE(data, history=bad)
    with pytest.raises(ValueError, match="history: must be finite"):
        EASE(data, history=torch.full((n_users, n_items), float("nan")))


def test_popularity_and_recommend_exclusion():
    data = Interactions.from_raw([0, 1, 2, 2, 1], [0, 1, 1, 2, 2])
    model = Popularity(data)
    np.testing.assert_array_equal(model.score([0]).numpy(), [[1, 2, 2]])
    ids, scores = model.recommend(torch.tensor([0, 2]), 2, exclude=[[1], [1, 2]])
    assert ids.tolist() == [[2, 0], [0, -1]]  # ties to the lower id; padding when nothing is left
    assert model(torch.tensor([0, 0]), torch.tensor([2, 0])).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match=r"users: id 3 out of range \[0, 3\)"):
        model.score([3])
    with pytest.raises(ValueError, match="items: shape"):
        model(torch.tensor([0]), torch.tensor([0, 1]))


def test_reference_table_on_ml_latest_small(ml_latest_small):
    """The reference figures of popularity and EASE^R (lambda 100) under the benchmark protocol:
    per-user temporal 80/20, full ranking, Recall@20 over min(|test|, 20)."""
    train, test = temporal_split(ml_latest_small, 0.2)
    popularity = evaluate(Popularity(train), train, test, ks=(20,), progress=False)
    ease = evaluate(EASE(train, lam=100.0), train, test, ks=(20,), progress=False)
    assert popularity["recall@20"] == pytest.approx(0.096, abs=1e-3)
    assert popularity["ndcg@20"] == pytest.approx(0.090, abs=1e-3)
    assert ease["recall@20"] == pytest.approx(0.168, abs=1e-3)
    assert ease["ndcg@20"] == pytest.approx(0.141, abs=1e-3)
