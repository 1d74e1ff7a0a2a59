"""The full softmax (``negatives="all"``): loss, catalogue scores, and training steps
against references written independently (per-pair forwards, float64 numpy)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankfast.baselines import Popularity
from rankfast.data import temporal_split
from rankfast.evaluate import evaluate
from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel, MLPConfig, MLPModel
from rankfast.train import MultiTask, TrainConfig, catalogue_scores, fit, full_softmax_loss

from helpers import QUIET, assert_same, dot_model, params, planted


def test_full_softmax_loss_matches_per_interaction_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7)) * 3
    rows, targets = rng.integers(0, 4, size=11), rng.integers(0, 7, size=11)
    expected = np.mean([np.log(np.exp(logits[r]).sum()) - logits[r, t] for r, t in zip(rows, targets, strict=True)])
    got = full_softmax_loss(torch.tensor(logits), torch.tensor(rows), torch.tensor(targets))
    assert abs(float(got) - expected) < 1e-12
    # Same as cross-entropy on the repeated rows, gradients included.
    a = torch.tensor(logits, requires_grad=True)
    b = torch.tensor(logits, requires_grad=True)
    full_softmax_loss(a, torch.tensor(rows), torch.tensor(targets)).backward()
    F.cross_entropy(b[torch.tensor(rows)], torch.tensor(targets)).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("items", [None, [11, 2, 7, 3]], ids=["every-item", "some-items"])
@pytest.mark.parametrize("kind", ["dot", "mlp"])
def test_catalogue_scores_match_the_forward_on_every_pair(kind, items):
    torch.manual_seed(0)
    if kind == "dot":
        model = DotModel(DotConfig(num_users=5, num_items=13, dim=6))
        (
            torch.nn.init.normal_(model.user_bias),
            torch.nn.init.normal_(model.item_bias),
            torch.nn.init.normal_(model.bias),
        )
    else:
        model = MLPModel(MLPConfig(num_users=5, num_items=13, dim=6, hidden=(8,)))
    model = model.double()
    users = torch.tensor([3, 0, 4])
    items = None if items is None else torch.tensor(items)
    got = catalogue_scores(model, users, items)
    columns = torch.arange(13) if items is None else items
    expected = torch.stack([model(torch.full((len(columns),), int(u)), columns) for u in users])
    torch.testing.assert_close(got, expected)
    # Gradients flow to the same parameters as through the forward (an item outside a subset gets none).
    weights = torch.randn(expected.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()), allow_unused=True)
    ref = torch.autograd.grad((expected * weights).sum(), list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref, strict=True):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("negatives", ["all", "partition"])
def test_a_full_softmax_step_matches_a_hand_written_one(negatives):
    """One step: the whole data in one batch ("all"), or one part holding the whole catalogue."""
    data = planted(n_users=12, n_items=20, per_user=5)
    model = dot_model(data, dim=4)
    manual = copy.deepcopy(model)
    one_step = {"batch_size": len(data)} if negatives == "all" else {"num_negatives": data.num_items}
    config = TrainConfig(
        epochs=1, loss="softmax", negatives=negatives, optimizer="sgd", lr=0.3, schedule="constant", **one_step, **QUIET
    )
    fit(model, data, config)
    # Reference: one SGD step on the mean cross-entropy of every interaction
    # against all items, scored pair by pair through the forward.
    users, items = torch.from_numpy(data.users), torch.from_numpy(data.items)
    n = data.num_items
    logits = manual(users.repeat_interleave(n), torch.arange(n).repeat(len(users))).view(len(users), n)
    F.cross_entropy(logits, items).backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.3 * p.grad
    assert_same(params(model), params(manual), rtol=1e-5, atol=1e-6)


def test_full_softmax_gradient_accumulation_matches_one_big_batch():
    data = planted(n_users=40, per_user=8)
    base = {"epochs": 2, "loss": "softmax", "negatives": "all", "optimizer": "sgd", "lr": 0.5, **QUIET}
    big, small = dot_model(data), dot_model(data)
    fit(big, data, TrainConfig(batch_size=64, grad_accum=1, **base))
    fit(small, data, TrainConfig(batch_size=16, grad_accum=4, **base))
    assert_same(params(big), params(small), rtol=1e-5, atol=1e-6)


def test_full_softmax_training_beats_popularity():
    train, test = temporal_split(planted(), 0.25)
    model = dot_model(train)
    fit(model, train, TrainConfig(epochs=12, batch_size=128, lr=0.05, loss="softmax", negatives="all", **QUIET))
    trained = evaluate(model, train, test, ks=(10,), progress=False)
    baseline = evaluate(Popularity(train), train, test, ks=(10,), progress=False)
    assert trained["recall@10"] > 0.6 and trained["recall@10"] > 2 * baseline["recall@10"]


def test_full_softmax_argument_errors():
    data = planted(n_users=20, per_user=4)
    with pytest.raises(ValueError, match="negatives: 'all' .* needs loss='softmax'"):
        TrainConfig(loss="bpr", negatives="all")
    TrainConfig(loss="softmax", negatives="all", num_negatives=0)  # unused: no error
    attention = AttentionModel(
        AttentionConfig(num_users=data.num_users, num_items=data.num_items, dim=4, hidden=(4,), unit_hidden=(4,))
    )
    config = TrainConfig(epochs=1, loss="softmax", negatives="all", **QUIET)
    with pytest.raises(ValueError, match="needs a history-free RankingModel, got AttentionModel"):
        fit(attention, data, config)
    with pytest.raises(ValueError, match="needs a history-free RankingModel, got MultiTask"):
        fit(MultiTask(dot_model(data)), data, config)
    with pytest.raises(ValueError, match="history-free"):
        catalogue_scores(attention, torch.tensor([0]))
