"""Training through the fused kernels (`rankfast.train.fused`) against training on the
models' own forward: same losses, same parameters after an epoch.

RANKFAST_BACKEND=fused (or its alias triton) selects them (on a CPU they run under TRITON_INTERPRET);
the reference run uses RANKFAST_BACKEND=reference.
"""

import numpy as np
import pytest
import torch

from rankfast.data import IdMap, Interactions
from rankfast.models import (
    AttentionConfig,
    AttentionModel,
    DotConfig,
    DotModel,
    MLPConfig,
    MLPModel,
    NeuMF,
    NeuMFConfig,
)
from rankfast.scoring import trains_fused
from rankfast.scoring.backends import fused as fused_backend
from rankfast.train import TrainConfig, fit

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_USERS, NUM_ITEMS, DIM = 7, 23, 8


def interactions(seed=0):
    """Each user interacts with 5 of the items (timestamps in order), ratings 1-5."""
    rng = np.random.default_rng(seed)
    users, items, ratings, stamps = [], [], [], []
    for u in range(NUM_USERS):
        picked = rng.choice(NUM_ITEMS, size=5, replace=False)
        users += [u] * 5
        items += picked.tolist()
        ratings += rng.integers(1, 6, size=5).tolist()
        stamps += list(range(5))
    return Interactions.from_raw(
        users, items, ratings, stamps, user_ids=IdMap(np.arange(NUM_USERS)), item_ids=IdMap(np.arange(NUM_ITEMS))
    )


def make(kind, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(24, 12), dropout=dropout))
    elif kind == "neumf":
        model = NeuMF(NeuMFConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20,), dropout=dropout))
    elif kind == "mf":
        model = DotModel(DotConfig(NUM_USERS, NUM_ITEMS, DIM))
    else:  # target attention, "din" or "dot"
        model = AttentionModel(
            AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(16,), unit_hidden=(12,), attention=kind, dropout=dropout)
        )
    return model.to(DEVICE)


def train(kind, backend, monkeypatch, **overrides):
    """One epoch of ``fit`` with ``RANKFAST_BACKEND=backend``: the trained model, its
    per-epoch history and how many batches went through the fused kernels."""
    monkeypatch.setenv("RANKFAST_BACKEND", backend)
    calls = []
    training_scores = fused_backend.training_scores

    def counting(*args, **kwargs):
        calls.append(1)
        return training_scores(*args, **kwargs)

    monkeypatch.setattr(fused_backend, "training_scores", counting)
    model = make(kind)
    # SGD, not Adam: Adam would blow up rounding noise in gradients that are zero in exact
    # arithmetic (e.g. the attention unit's output bias under a softmax) to full-size steps.
    config = dict(
        epochs=1, batch_size=12, num_negatives=3, optimizer="sgd", lr=0.5, max_history=4, progress=False, seed=3
    )
    config.update(overrides)
    history = fit(model, interactions(), TrainConfig(**config))
    return model, history, len(calls)


def assert_same_training(kind, monkeypatch, rtol=1e-4, atol=1e-5, **overrides):
    fused_model, fused_history, calls = train(kind, "triton", monkeypatch, **overrides)
    ref_model, ref_history, ref_calls = train(kind, "reference", monkeypatch, **overrides)
    assert calls == 3 and ref_calls == 0  # 35 interactions in batches of 12
    torch.testing.assert_close(fused_history[0]["loss"], ref_history[0]["loss"], rtol=rtol, atol=atol)
    for (name, got), want in zip(fused_model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)


# Each loss on the MLP; the others with one loss each (the kernels see only d loss / d score).
@pytest.mark.parametrize(
    "kind,loss,negatives",
    [
        ("mlp", "bce", "uniform"),
        ("mlp", "softmax", "popularity"),
        ("mlp", "bpr", "uniform"),
        ("neumf", "bce", "uniform"),
        ("din", "softmax", "popularity"),
        ("dot", "bce", "uniform"),
    ],
)
def test_training_through_the_kernels_matches_the_models_forward(kind, loss, negatives, monkeypatch):
    assert_same_training(kind, monkeypatch, loss=loss, negatives=negatives)


@pytest.mark.parametrize("kind", ["mlp", "neumf"])
def test_full_softmax_and_mse_through_the_kernels(kind, monkeypatch):
    assert_same_training(kind, monkeypatch, loss="softmax", negatives="all")
    assert_same_training(kind, monkeypatch, loss="mse")


@pytest.mark.parametrize("kind", ["mlp", "din"])
def test_bf16_autocast_through_the_kernels(kind, monkeypatch):
    # Both runs round to bfloat16 at different points: agreement to bf16 precision.
    assert_same_training(kind, monkeypatch, rtol=5e-2, atol=2e-2, bf16=True)


def test_dispatch_follows_the_backend_setting(monkeypatch):
    mlp = make("mlp")
    for backend in ("auto", "reference", "factorized"):  # opt-in until the kernels beat eager (see trains_fused)
        monkeypatch.setenv("RANKFAST_BACKEND", backend)
        assert not trains_fused(mlp)
    monkeypatch.setenv("RANKFAST_BACKEND", "triton")
    assert trains_fused(mlp)
    with pytest.raises(ValueError, match="the fused backend does not cover this DotModel"):
        trains_fused(make("mf"))
    with pytest.raises(ValueError, match="no dropout"):
        trains_fused(make("din", dropout=0.2))
    monkeypatch.setenv("RANKFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="RANKFAST_BACKEND"):
        trains_fused(mlp)


def test_training_runs_the_models_forward_by_default(monkeypatch):
    monkeypatch.setenv("RANKFAST_BACKEND", "auto")
    calls = []
    monkeypatch.setattr(fused_backend, "training_scores", lambda *a, **k: calls.append(1))
    fit(make("mlp"), interactions(), TrainConfig(epochs=1, batch_size=12, progress=False))
    assert not calls
