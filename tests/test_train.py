import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankfast.baselines import Popularity
from rankfast.data import Interactions, temporal_split
from rankfast.evaluate import evaluate, evaluate_pointwise
from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel, MLPConfig, MLPModel, load_model
from rankfast.train import (
    MultiTask,
    TrainConfig,
    bce_loss,
    bpr_loss,
    build_optimizer,
    build_scheduler,
    fit,
    load_checkpoint,
    mse_loss,
    sampled_softmax_loss,
    save_checkpoint,
)
from rankfast.train import loop as loop_module
from rankfast.train.batching import SampledNegatives

from helpers import QUIET, assert_same, dot_model, params, planted

# --- losses, optimizers, schedules --------------------------------------------------


def test_losses_against_formulas():
    torch.manual_seed(0)
    pos, neg = torch.randn(5), torch.randn(5, 3)
    expected_bce = -(torch.log(torch.sigmoid(pos)).sum() + torch.log(1 - torch.sigmoid(neg)).sum()) / 20
    torch.testing.assert_close(bce_loss(pos, neg), expected_bce)
    expected_bpr = -torch.log(torch.sigmoid(pos[:, None] - neg)).mean()
    torch.testing.assert_close(bpr_loss(pos, neg), expected_bpr)
    log_q_pos, log_q_neg = torch.log(torch.rand(5)), torch.log(torch.rand(5, 3))
    logits = torch.cat([(pos - log_q_pos)[:, None], neg - log_q_neg], 1)
    expected_softmax = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    torch.testing.assert_close(sampled_softmax_loss(pos, neg, log_q_pos, log_q_neg), expected_softmax)
    # A uniform proposal makes logQ correction a no-op.
    flat = torch.full((5,), math.log(0.1))
    torch.testing.assert_close(
        sampled_softmax_loss(pos, neg, flat, torch.full((5, 3), math.log(0.1))),
        F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(5, dtype=torch.long)),
    )
    torch.testing.assert_close(mse_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])), torch.tensor(2.5))


def test_schedules():
    model = torch.nn.Linear(2, 2)
    for schedule, at_mid in (("cosine", 0.5 * (1 + math.cos(math.pi * 0.5))), ("linear", 0.5), ("constant", 1.0)):
        opt = build_optimizer(model, "sgd", lr=1.0)
        sched = build_scheduler(opt, total_steps=14, warmup_steps=4, schedule=schedule)
        lrs = []
        for _ in range(14):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert lrs[9] == pytest.approx(at_mid)  # halfway through the 10 decay steps
    with pytest.raises(ValueError, match="schedule: expected one of"):
        build_scheduler(build_optimizer(model), total_steps=1, schedule="step")


def test_optimizers_and_weight_decay_groups():
    model = torch.nn.Linear(3, 2)
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)):
        opt = build_optimizer(model, name, lr=0.1, weight_decay=0.01)
        assert isinstance(opt, cls)
        decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert decays == {id(model.weight): 0.01, id(model.bias): 0.0}
    assert build_optimizer(model, "sgd", momentum=0.8).param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        build_optimizer(model, "lion")
    with pytest.raises(ValueError, match="lr: must be positive"):
        build_optimizer(model, lr=0)


# --- the loop -----------------------------------------------------------------------


def test_training_beats_popularity_on_planted_structure():
    train, test = temporal_split(planted(), 0.25)
    model = dot_model(train)
    history = fit(model, train, TrainConfig(epochs=12, batch_size=128, lr=0.05, loss="bpr", **QUIET), valid=test)
    assert len(history) == 12 and history[-1]["loss"] < history[0]["loss"]
    trained = evaluate(model, train, test, ks=(10,), progress=False)
    baseline = evaluate(Popularity(train), train, test, ks=(10,), progress=False)
    assert trained["recall@10"] > 0.6 and trained["recall@10"] > 2 * baseline["recall@10"]


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_gradient_accumulation_matches_one_big_batch(loss):
    data = planted(n_users=40, per_user=8)  # 320 interactions: 5 steps of 64
    # SGD: Adam would turn float rounding noise in near-zero gradients into full-size steps.
    base = {"epochs": 2, "loss": loss, "optimizer": "sgd", "lr": 0.5, "negatives": "popularity", **QUIET}
    big, small = dot_model(data), dot_model(data)
    fit(big, data, TrainConfig(batch_size=64, grad_accum=1, **base))
    fit(small, data, TrainConfig(batch_size=16, grad_accum=4, **base))
    assert_same(params(big), params(small), rtol=1e-5, atol=1e-6)
    # ...and the accumulated run differs from 4x as many plain steps of 16.
    plain = dot_model(data)
    fit(plain, data, TrainConfig(batch_size=16, grad_accum=1, **base))
    assert not torch.allclose(
        params(plain)["item_repr.embedding.weight"], params(small)["item_repr.embedding.weight"], atol=1e-4
    )


def _mlp(data, seed=0):
    torch.manual_seed(seed)
    return MLPModel(MLPConfig(num_users=data.num_users, num_items=data.num_items, dim=8, hidden=(16,), dropout=0.3))


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    """Dropout (torch RNG), negatives, Adam moments and the LR schedule must all resume exactly."""
    train, valid = temporal_split(planted(n_users=40, per_user=8), 0.25)
    config = {"epochs": 3, "batch_size": 32, "lr": 0.01, "warmup_steps": 2, "grad_clip": 1.0, **QUIET}
    reference = _mlp(train)
    ref_history = fit(reference, train, TrainConfig(checkpoint_dir=str(tmp_path / "a"), **config), valid=valid)

    calls = {"n": 0}
    real_loss = SampledNegatives.loss
    steps_per_epoch = -(-len(train) // config["batch_size"])

    def crashing_loss(self, net, idx, negatives):
        calls["n"] += 1
        if calls["n"] > 2 * steps_per_epoch + 2:  # in the third epoch
            raise RuntimeError("killed")
        return real_loss(self, net, idx, negatives)

    monkeypatch.setattr(SampledNegatives, "loss", crashing_loss)
    with pytest.raises(RuntimeError, match="killed"):
        fit(_mlp(train), train, TrainConfig(checkpoint_dir=str(tmp_path / "b"), **config), valid=valid)
    monkeypatch.setattr(SampledNegatives, "loss", real_loss)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2

    resumed = _mlp(train, seed=123)  # different initial weights: all must come from the checkpoint
    history = fit(resumed, train, TrainConfig(checkpoint_dir=str(tmp_path / "b"), **config), valid=valid)
    assert_same(params(reference), params(resumed))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(history) == strip(ref_history)
    # The best model is saved with the id mappings, loadable on its own.
    saved = load_model(tmp_path / "b" / "model")
    assert_same(params(saved), params(resumed))
    assert (tmp_path / "b" / "model" / "mappings.json").exists()
    assert not [f for f in os.listdir(tmp_path / "b") if ".tmp" in f]


def test_resume_refuses_a_different_config(tmp_path):
    data = planted(n_users=20, per_user=4)
    fit(dot_model(data), data, TrainConfig(epochs=1, checkpoint_dir=str(tmp_path), **QUIET))
    with pytest.raises(ValueError, match=r"config.lr: 0.5 differs from the checkpoint's 0.001"):
        fit(dot_model(data), data, TrainConfig(epochs=2, lr=0.5, checkpoint_dir=str(tmp_path), **QUIET))


def test_seeded_runs_are_identical():
    data = planted(n_users=30, per_user=6)
    a, b = _mlp(data), _mlp(data)
    config = TrainConfig(epochs=2, batch_size=32, **QUIET)
    assert fit(a, data, config)[-1]["loss"] == fit(b, data, config)[-1]["loss"]
    assert_same(params(a), params(b))


def test_early_stopping_restores_the_best_weights(monkeypatch):
    data = planted(n_users=30, per_user=6)
    constant = {"batch_size": 32, "schedule": "constant", "lr": 0.01, **QUIET}
    after_two = dot_model(data)
    fit(after_two, data, TrainConfig(epochs=2, **constant))

    scripted = iter([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
    monkeypatch.setattr(loop_module._Trainer, "_validate", lambda self: {"ndcg@20": next(scripted)})
    model = dot_model(data)
    history = fit(model, data, TrainConfig(epochs=6, patience=2, **constant), valid=data)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert_same(params(model), params(after_two))


def test_rating_regression_bf16_and_multitask():
    train, valid = temporal_split(planted(n_users=60, per_user=10), 0.25)
    model = dot_model(train, dim=8)
    history = fit(
        model, train, TrainConfig(epochs=10, loss="mse", lr=0.05, batch_size=32, bf16=True, **QUIET), valid=valid
    )
    assert history[-1]["rmse"] < history[0]["rmse"] and math.isfinite(history[-1]["loss"])
    mean_rmse = float(np.sqrt(((valid.ratings - train.ratings.mean()) ** 2).mean()))
    assert history[-1]["rmse"] < mean_rmse

    multi = MultiTask(dot_model(train, dim=8), hidden=(16,), rating_weight=0.5)
    history = fit(multi, train, TrainConfig(epochs=6, loss="bce", lr=0.05, batch_size=64, **QUIET), valid=valid)
    assert {"ndcg@20", "rmse", "mae"} <= history[-1].keys()
    assert history[-1]["loss"] < history[0]["loss"]
    best = max(history, key=lambda r: r["ndcg@20"])  # the weights fit restores
    assert evaluate_pointwise(multi, train, valid, task="rating")["rmse"] == pytest.approx(best["rmse"])
    with pytest.raises(ValueError, match="loss: a MultiTask model trains ratings itself"):
        fit(multi, train, TrainConfig(loss="mse", **QUIET))


def test_multitask_rating_head_works_in_the_ratings_units():
    train = planted(n_users=60, per_user=10)
    multi = MultiTask(dot_model(train, dim=8), hidden=(16,))
    fit(multi, train, TrainConfig(epochs=1, loss="bce", batch_size=64, **QUIET))
    ratings = torch.from_numpy(train.ratings).double()
    assert float(multi.rating_mean) == pytest.approx(float(ratings.mean()))
    assert float(multi.rating_std) == pytest.approx(float(ratings.std(correction=0)))
    users, items = torch.tensor([0, 5, 9]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        _, predicted = multi(users, items)
        head = multi.rating_head(torch.cat([multi.base.user_repr(users), multi.base.item_repr(items)], dim=1))[:, 0]
    torch.testing.assert_close(predicted, multi.rating_mean + multi.rating_std * head)
    loss = multi.rating_loss(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]))
    assert float(loss) == pytest.approx(1.0 / float(multi.rating_std) ** 2, rel=1e-6)  # MSE 1 in rating_std units


def test_multitask_loss_rates_the_positives():
    """A step's loss against a hand computation from the forward over every pair."""
    from rankfast.train.batching import Examples
    from rankfast.train.distributed import distributed_context

    train = planted(n_users=30, per_user=6)
    multi = MultiTask(dot_model(train, dim=8), hidden=(16,), rating_weight=0.7)
    multi.set_rating_scale(train.ratings)
    config = TrainConfig(loss="bce", num_negatives=3, batch_size=16, **QUIET)
    strategy = SampledNegatives(
        multi, train, Examples(train, 5, False), config, distributed_context(), torch.device("cpu"), backend=None
    )
    idx, negatives = strategy.micro_batches(1)[0]
    users, items = torch.from_numpy(train.users)[idx], torch.from_numpy(train.items)[idx]
    candidates = torch.cat([items[:, None], negatives], dim=1)
    clicks, ratings = multi(users.repeat_interleave(4), candidates.reshape(-1))
    clicks, ratings = clicks.view(-1, 4), ratings.view(-1, 4)[:, 0]  # the positives' ratings
    target = torch.from_numpy(train.ratings)[idx]
    expected = bce_loss(clicks[:, 0], clicks[:, 1:]) + 0.7 * ((ratings - target) / multi.rating_std).pow(2).mean()
    torch.testing.assert_close(strategy.loss(multi, idx, negatives), expected)


def test_attention_model_trains_on_leakage_free_histories():
    train, valid = temporal_split(planted(n_users=40, per_user=10), 0.25)
    torch.manual_seed(0)
    model = AttentionModel(
        AttentionConfig(num_users=train.num_users, num_items=train.num_items, dim=8, hidden=(16,), unit_hidden=(8,))
    )
    history = fit(
        model, train, TrainConfig(epochs=2, loss="softmax", max_history=5, batch_size=64, **QUIET), valid=valid
    )
    assert len(history) == 2 and math.isfinite(history[-1]["loss"]) and "ndcg@20" in history[-1]


def test_argument_errors():
    data = planted(n_users=20, per_user=4)
    with pytest.raises(ValueError, match="loss: expected one of"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="batch_size: must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="train: has 20 users and"):
        fit(DotModel(DotConfig(num_users=5, num_items=data.num_items, dim=4)), data)
    with pytest.raises(TypeError, match="model: expected a rankfast.models.RankingModel"):
        fit(torch.nn.Linear(2, 2), data)
    no_ratings = Interactions(data.users, data.items, None, data.timestamps, data.user_ids, data.item_ids)
    with pytest.raises(ValueError, match="train: loss 'mse'"):
        fit(dot_model(data), no_ratings, TrainConfig(loss="mse", **QUIET))
    with pytest.raises(ValueError, match="patience: early stopping needs validation data"):
        fit(dot_model(data), data, TrainConfig(patience=2, **QUIET))
    with pytest.raises(ValueError, match="monitor: 'auc' is not among"):
        fit(dot_model(data), data, TrainConfig(epochs=1, monitor="auc", **QUIET), valid=data)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="path: no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
