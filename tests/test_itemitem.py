"""ItemItem: EASE^R's form learned by gradient descent. Its forward and catalogue scores against
a numpy hand computation with the diagonal left out, its gradients against float64 autograd of
the plain formula, its EASE^R starting point against rankfast.baselines.EASE, saving through the
model directory, and its config errors. Scoring on every backend: the "itemitem" case of
tests/helpers.py's CASES (tests/test_scoring_contract.py, tests/test_score.py, tests/test_models.py)."""

import numpy as np
import pytest
import torch

import rankfast
from rankfast import Ranker
from rankfast.baselines import EASE, ease_weights
from rankfast.data import history_features
from rankfast.models import ItemItem, ItemItemConfig
from rankfast.ranker import save_model_dir
from rankfast.train import TrainConfig, catalogue_scores, fit

from helpers import QUIET, pair_forward, planted

USERS, ITEMS = 6, 13


def _rows(seed=0):
    """Sparse non-negative history rows; user 2 has none."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(USERS, ITEMS, generator=gen, dtype=torch.float64)
    rows[torch.rand(USERS, ITEMS, generator=gen) < 0.6] = 0.0
    rows[2] = 0.0
    return rows


def _model(seed=0):
    """A float64 ItemItem with random weights (diagonal too) and item biases."""
    gen = torch.Generator().manual_seed(seed + 1)
    weights = torch.randn(ITEMS, ITEMS, generator=gen, dtype=torch.float64)
    model = ItemItem(ItemItemConfig(USERS, ITEMS), user_features=_rows(seed), weights=weights).double()
    with torch.no_grad():
        model.item_bias.copy_(torch.randn(ITEMS, generator=gen, dtype=torch.float64))
    return model


def _numpy_scores(rows, weights, bias):
    """``score[u, i] = sum_{j != i} rows[u, j] * weights[j, i] + bias[i]``, by loops."""
    out = np.zeros((rows.shape[0], weights.shape[1]))
    for u in range(rows.shape[0]):
        for i in range(weights.shape[1]):
            out[u, i] = sum(rows[u, j] * weights[j, i] for j in range(rows.shape[1]) if j != i) + bias[i]
    return out


def test_forward_and_user_scores_match_a_hand_computation_without_the_diagonal():
    model = _model()
    rows = model.user_repr.features  # _rows(), held in the default dtype then made float64
    want = _numpy_scores(rows.numpy(), model.weights.detach().numpy(), model.item_bias.detach().numpy())
    users = torch.tensor([0, 2, 5, 3, 0, 1, 4])
    items = torch.tensor([0, 4, 12, 3, 7, 1, 1])
    np.testing.assert_allclose(model(users, items).detach().numpy(), want[users, items], rtol=1e-12)
    every = torch.arange(USERS)
    np.testing.assert_allclose(model.user_scores(every).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # The forward over every item, the catalogue scores of training and of a subset of candidates agree.
    forward = pair_forward(model, every, torch.arange(ITEMS))
    torch.testing.assert_close(model.user_scores(every), forward, rtol=1e-12, atol=1e-12)
    subset = torch.tensor([5, 0, 5, 12])
    np.testing.assert_allclose(model.user_scores(every, subset).detach().numpy(), want[:, subset], rtol=1e-12)
    torch.testing.assert_close(catalogue_scores(model, users, subset), forward[users][:, subset])


def test_gradients_match_float64_autograd_of_the_plain_formula():
    model = _model(seed=3)
    users = torch.tensor([1, 2, 4, 1, 0])
    targets = torch.tensor([3, 0, 12, 7, 7])
    pairs = torch.tensor([2, 2, 9, 7, 0])
    weights = model.weights.detach().clone().requires_grad_()
    bias = model.item_bias.detach().clone().requires_grad_()
    plain = model.user_repr.features[users] @ (weights - torch.diag(torch.diagonal(weights))) + bias
    loss = torch.nn.functional.cross_entropy(plain, targets) + plain.gather(1, pairs[:, None]).square().sum()
    loss.backward()
    # The full softmax through user_scores, the pair term through the forward, as training reads them.
    scores = model.user_scores(users)
    got = torch.nn.functional.cross_entropy(scores, targets) + model(users, pairs).square().sum()
    got.backward()
    torch.testing.assert_close(model.weights.grad, weights.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.item_bias.grad, bias.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(torch.diagonal(model.weights.grad)) == 0  # the diagonal never counts


@pytest.mark.parametrize("num_users, num_items", [(40, 15), (15, 40)])  # EASE^R's primal and dual forms
def test_started_from_ease_weights_it_scores_what_ease_scores(num_users, num_items):
    rng = np.random.default_rng(0)
    users, items = np.nonzero(rng.random((num_users, num_items)) < 0.3)
    # Every id present, so the maps are the identity.
    users = np.concatenate([users, np.arange(num_users), np.zeros(num_items, dtype=np.int64)])
    items = np.concatenate([items, np.zeros(num_users, dtype=np.int64), np.arange(num_items)])
    data = rankfast.data.Interactions.from_raw(users, items, timestamps=np.arange(len(users)))
    rows = history_features(data, half_life=3.0, floor=0.1)
    model = ItemItem(ItemItemConfig(num_users, num_items), user_features=rows, weights=ease_weights(data, lam=3.0))
    want = EASE(data, lam=3.0, history=rows).score(np.arange(num_users))
    torch.testing.assert_close(model.user_scores(torch.arange(num_users)).detach(), want, rtol=1e-4, atol=1e-5)
    assert not ItemItem(ItemItemConfig(num_users, num_items), user_features=rows).weights.any()  # else zeros


def test_full_softmax_training_and_the_model_directory(tmp_path):
    """Trained from EASE^R's weights with the full softmax, the model ranks each user's planted group
    first and comes back from its model directory scoring the same."""
    train = planted(n_users=40, n_items=24, per_user=5)
    model = ItemItem(
        ItemItemConfig(train.num_users, train.num_items),
        user_features=history_features(train),
        weights=ease_weights(train, lam=10.0),
    )
    before = model.weights.detach().clone()
    fit(model, train, TrainConfig(epochs=3, loss="softmax", negatives="all", lr=1e-2, batch_size=64, **QUIET))
    assert not torch.equal(model.weights, before)
    users = torch.arange(train.num_users)
    ranker = Ranker.load(save_model_dir(tmp_path / "model", model, train))
    loaded = ranker.model
    assert type(loaded) is ItemItem and loaded.config == model.config
    torch.testing.assert_close(loaded.user_repr.features, model.user_repr.features, rtol=0, atol=0)
    torch.testing.assert_close(rankfast.score(loaded, users), rankfast.score(model, users), rtol=0, atol=0)
    # A user's top items, their own excluded, are in their group: held by users who share an item with them.
    x = (model.user_repr.features > 0).double()
    in_group = ((x @ x.T) > 0).double() @ x > 0  # [users, items]
    top = rankfast.score(model, users, k=1, exclude=[x[u].nonzero()[:, 0] for u in users])[0][:, 0]
    assert in_group[users, top].all()


def test_config_and_argument_errors():
    rows = _rows()
    assert ItemItemConfig(USERS, ITEMS).dim == ItemItemConfig(USERS, ITEMS).user_feature_dim == ITEMS
    for name in ("dim", "user_feature_dim"):
        with pytest.raises(ValueError, match=f"ItemItemConfig.{name}: .* must be num_items=13"):
            ItemItemConfig(USERS, ITEMS, **{name: 8})
    for bad in ({"item_feature_dim": 3}, {"user_hybrid": True}, {"item_hybrid": True, "item_feature_dim": 3}):
        with pytest.raises(ValueError, match="item features and hybrid sides do not apply"):
            ItemItemConfig(USERS, ITEMS, **bad)
    field = rankfast.data.Field("age", "user", vocab=("a", "b"))
    with pytest.raises(ValueError, match="ItemItemConfig.fields: the item-item model reads no feature fields"):
        ItemItemConfig(USERS, ITEMS, fields=(field,))
    with pytest.raises(ValueError, match="user_features"):
        ItemItem(ItemItemConfig(USERS, ITEMS))
    with pytest.raises(ValueError, match=r"weights: expected shape \(13, 13\), got \(13, 12\)"):
        ItemItem(ItemItemConfig(USERS, ITEMS), user_features=rows, weights=torch.zeros(ITEMS, ITEMS - 1))
    for bad in (np.zeros((ITEMS, ITEMS)), torch.zeros(ITEMS, ITEMS, dtype=torch.long)):
        with pytest.raises(TypeError, match="weights: expected a floating-point tensor"):
            ItemItem(ItemItemConfig(USERS, ITEMS), user_features=rows, weights=bad)
    with pytest.raises(ValueError, match="lam: must be positive"):
        ease_weights(planted(), lam=0.0)
