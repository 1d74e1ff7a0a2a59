"""Training an AttentionModel through the factorized scores (`rankfast.scoring.backends.factorized.
training_scores`): the same scores and gradients as the model's own forward over expanded pairs,
in float64, on both of its paths (the unit tabled over distinct items, or run per history slot)."""

import math

import pytest
import torch

from rankfast.models import AttentionConfig, AttentionModel
from rankfast.scoring.backends import factorized
from rankfast.train import TrainConfig, fit

from helpers import NUM_ITEMS, NUM_USERS, make_model, pair_forward, planted, random_history

CASES = ["din", "din-raw", "dot-attention", "dot-attention-raw", "din-features", "din-hybrid"]


@pytest.mark.parametrize("tabled", [True, False], ids=["unit-table", "unit-per-slot"])
@pytest.mark.parametrize("case", CASES)
def test_scores_and_gradients_match_the_models_forward(case, tabled, monkeypatch):
    monkeypatch.setattr(factorized, "UNIT_TABLE_MIN_REUSE", 0.0 if tabled else math.inf)
    model = make_model(case).eval()  # float64; eval: the reference's dropout off too
    gen = torch.Generator().manual_seed(5)
    b, w, max_len = 11, 4, 5
    users = torch.randint(0, NUM_USERS, (b,), generator=gen)
    items = torch.randint(0, NUM_ITEMS, (b, w), generator=gen)
    history, lengths = random_history(b, max_len, seed=6)  # lengths 0..5, padded with -1
    upstream = torch.randn(b, w, generator=gen, dtype=torch.float64)

    def scores_and_grads(compute):
        model.zero_grad()
        scores = compute()
        (scores * upstream).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got, got_grads = scores_and_grads(lambda: factorized.training_scores(model, users, items, history, lengths))
    want, want_grads = scores_and_grads(lambda: pair_forward(model, users, items, history, lengths))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def _train(backend, monkeypatch):
    """One epoch of ``fit`` of a DIN model with ``RANKFAST_BACKEND=backend``: the model, its
    history and how many batches went through ``training_scores``."""
    monkeypatch.setenv("RANKFAST_BACKEND", backend)
    calls = []
    original = factorized.training_scores

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(factorized, "training_scores", counting)
    data = planted(n_users=30, n_items=24, per_user=6)
    torch.manual_seed(2)
    model = AttentionModel(AttentionConfig(30, 24, 8, hidden=(16,), unit_hidden=(12, 5)))
    config = TrainConfig(
        epochs=1, loss="softmax", num_negatives=5, batch_size=64, optimizer="sgd", lr=0.1, max_history=4, progress=False
    )
    history = fit(model, data, config)
    return model, history, len(calls)


def test_fit_trains_attention_through_the_factorized_scores_by_default(monkeypatch):
    model, history, calls = _train("auto", monkeypatch)
    ref_model, ref_history, ref_calls = _train("reference", monkeypatch)  # the model's own forward
    assert calls == 3 and ref_calls == 0  # 180 interactions in batches of 64
    torch.testing.assert_close(history[0]["loss"], ref_history[0]["loss"], rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
