import numpy as np
import pytest
import torch

from rankfast.baselines import ALS, EASE, Popularity, als_half_step, ease_weights, training_pattern
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


def _binary(data):
    x = np.zeros((data.num_users, data.num_items))
    x[data.users, data.items] = 1.0
    return x


def _ease_weights_reference(data, lam):
    x = _binary(data)
    p = np.linalg.inv(x.T @ x + lam * np.eye(data.num_items))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def _ease_reference(data, lam, history=None):
    return (_binary(data) if history is None else history) @ _ease_weights_reference(data, lam)


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


@pytest.mark.parametrize("n_users, n_items", [(40, 15), (15, 40)])  # primal and dual (Woodbury) forms
def test_ease_weights_match_closed_form(n_users, n_items):
    data = _random_data(n_users, n_items, seed=4)
    got = ease_weights(data, lam=3.0)
    assert got.dtype == torch.float32 and not torch.diagonal(got).any()
    np.testing.assert_allclose(got.numpy(), _ease_weights_reference(data, 3.0), rtol=1e-4, atol=1e-6)


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


# --- ALS ---------------------------------------------------------------------------------------


def _pattern(mask):
    indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64))
    indices = torch.from_numpy(np.nonzero(mask)[1].astype(np.int64))
    return training_pattern(indptr, indices, mask.shape[1], torch.float64)


def _weighted_least_squares(mask, y, reg, alpha):
    """Each row's argmin_x sum_j c_j (p_j - x.y_j)^2 + reg |x|^2, by numpy's solver (float64)."""
    y = np.asarray(y, dtype=np.float64)
    out = []
    for row in mask:
        c = np.where(row, 1.0 + alpha, 1.0)
        out.append(np.linalg.solve(y.T @ (c[:, None] * y) + reg * np.eye(y.shape[1]), y.T @ (c * row)))
    return np.stack(out)


@pytest.mark.parametrize("alpha", [2.5, 0.0])
def test_als_half_step_is_the_weighted_least_squares_solution(alpha):
    rng = np.random.default_rng(0)
    mask = rng.random((7, 11)) < 0.35
    mask[2] = False  # a row without columns: its solution is 0
    x, y = torch.from_numpy(rng.random((7, 4))), torch.from_numpy(rng.random((11, 4)))
    got = als_half_step(x.clone(), y, _pattern(mask), 0.3, alpha, 12)  # 12 CG steps >= 4 factors: converged
    np.testing.assert_allclose(got.numpy(), _weighted_least_squares(mask, y, 0.3, alpha), rtol=1e-9, atol=1e-10)


def test_als_conjugate_gradient_approaches_the_solution_step_by_step():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30)) < 0.3
    x, y = torch.from_numpy(rng.random((20, 8))), torch.from_numpy(rng.random((30, 8)))
    want = _weighted_least_squares(mask, y, 0.1, 4.0)
    errors = [np.abs(als_half_step(x.clone(), y, _pattern(mask), 0.1, 4.0, s).numpy() - want).max() for s in (1, 3, 24)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_als_fit_alternates_half_steps():
    """Two iterations of ALS (conjugate gradient run to convergence) against numpy's solutions,
    from the same initial factors."""
    data = _random_data(9, 13, seed=4)
    model = ALS(data, factors=3, reg=0.2, alpha=3.0, iterations=2, cg_steps=10, seed=5)
    gen = torch.Generator().manual_seed(5)
    torch.rand(9, 3, generator=gen)  # the users' initial factors: the first half step starts there
    y = (torch.rand(13, 3, generator=gen) * 0.01).double().numpy()
    mask = np.zeros((9, 13), dtype=bool)
    mask[data.users, data.items] = True
    for _ in range(2):
        x = _weighted_least_squares(mask, y, 0.2, 3.0)
        y = _weighted_least_squares(mask.T, x, 0.2, 3.0)
    np.testing.assert_allclose(model.user_factors.numpy(), x, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(model.item_factors.numpy(), y, rtol=1e-3, atol=1e-5)
    users, items = np.array([0, 4, 8]), np.array([12, 0, 5])
    np.testing.assert_allclose(model.score(users).numpy(), x[users] @ y.T, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(model(users, items).numpy(), (x[users] * y[items]).sum(1), rtol=1e-3, atol=1e-5)


def test_als_ranks_planted_groups_and_checks_arguments():
    data = Interactions.from_raw(
        np.repeat(np.arange(8), 3), [0, 1, 2, 1, 2, 3, 0, 2, 3, 0, 1, 3, 4, 5, 6, 5, 6, 7, 4, 6, 7, 4, 5, 7]
    )
    model = ALS(data, factors=4, reg=0.1, alpha=10.0, iterations=10)
    ids, _ = model.recommend(torch.arange(8), 1, exclude=[data.items[data.users == u] for u in range(8)])
    # Users 0-3 saw three of items 0-3, users 4-7 three of items 4-7: the fourth is recommended.
    assert ids[:, 0].tolist() == [3, 0, 1, 2, 7, 4, 5, 6]
    for name, value in (("factors", 0), ("iterations", 1.5), ("cg_steps", True)):
        with pytest.raises(ValueError, match=f"{name}: expected a positive int"):
            ALS(data, **{name: value})
    with pytest.raises(ValueError, match="reg: must be non-negative"):
        ALS(data, reg=-1.0)
    with pytest.raises(ValueError, match="alpha: must be non-negative"):
        ALS(data, alpha=float("nan"))
