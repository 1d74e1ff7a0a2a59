"""Labelled training: TrainConfig tasks (click, rating) and their losses on exactly the labelled
rows, the point-wise metrics against sklearn, serving with a raw context, and MovieLens CTR."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rankfast
from rankfast import metrics
from rankfast.baselines import Popularity
from rankfast.data import Field, Interactions, build_features, random_split, temporal_split
from rankfast.evaluate import evaluate, evaluate_pointwise
from rankfast.models import DeepFM, DeepFMConfig, MLPConfig, MLPModel, RecommenderNet, RecommenderNetConfig
from rankfast.ranker import Ranker, save_model_dir
from rankfast.train import TrainConfig, fit

from helpers import QUIET, dot_model, planted

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def impressions(n_users=40, n_items=30, per_user=12, seed=0):
    """Labelled impressions: a user clicks items of its own group (item % 4 == user % 4) at
    hour 20, never otherwise; items carry their group as a field."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.integers(0, n_items, len(users))
    hours = rng.choice([8, 20], len(users))
    labels = ((items % 4 == users % 4) & (hours == 20)).astype(np.float32)
    data = Interactions.from_raw(users, items, labels, np.arange(len(users)))
    features = build_features(
        [Field("group", "item"), Field("hour", "context")],
        num_users=data.num_users,
        num_items=data.num_items,
        num_rows=len(data),
        item={"group": data.item_ids.raw % 4},
        context={"hour": hours},
    )
    return Interactions(
        data.users, data.items, data.ratings, data.timestamps, data.user_ids, data.item_ids, None, features
    )


def test_tasks_take_their_losses_and_negatives():
    assert (TrainConfig(task="click").loss, TrainConfig(task="click").negatives) == ("bce", "none")
    assert TrainConfig(task="click").monitor == "auc"
    assert (TrainConfig(loss="mse").task, TrainConfig(loss="mse").negatives, TrainConfig(loss="mse").monitor) == (
        "rating",
        "none",
        "rmse",
    )
    assert TrainConfig(loss="ce").task == "rating"
    assert (TrainConfig().task, TrainConfig().loss, TrainConfig().negatives) == ("ranking", "bce", "uniform")
    with pytest.raises(ValueError, match=r"loss: task 'click' takes \['bce'\], got 'bpr'"):
        TrainConfig(task="click", loss="bpr")
    with pytest.raises(ValueError, match=r"loss: task 'ranking' takes .* got 'mse'; loss 'mse' is for task 'rating'"):
        TrainConfig(task="ranking", loss="mse")
    with pytest.raises(ValueError, match=r"negatives: task 'rating' takes \['none'\], got 'uniform'"):
        TrainConfig(task="rating", negatives="uniform")
    with pytest.raises(ValueError, match="negatives: task 'ranking' takes"):
        TrainConfig(negatives="none")
    with pytest.raises(ValueError, match="task: expected one of"):
        TrainConfig(task="ctr")


def test_click_training_is_log_loss_on_exactly_the_labelled_rows():
    data = impressions()
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(num_users=data.num_users, num_items=data.num_items, dim=8, hidden=(8,)))
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(
            model(torch.from_numpy(data.users), torch.from_numpy(data.items)), torch.from_numpy(data.ratings)
        )
    # One micro-batch holding every row: its loss is computed before the step.
    history = fit(model, data, TrainConfig(task="click", epochs=1, batch_size=len(data), **QUIET))
    assert history[0]["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_labelled_rows_are_never_ranked_as_positives():
    data = impressions()
    model = MLPModel(MLPConfig(num_users=data.num_users, num_items=data.num_items, dim=4))
    with pytest.raises(ValueError, match=r"train: row \d+ \(and \d+ more\) is labelled 0, and task 'ranking'"):
        fit(model, data, TrainConfig(loss="bce", **QUIET))
    with pytest.raises(ValueError, match=r"negatives: 'uniform' samples negatives, and the data has its own"):
        fit(model, data, TrainConfig(task="click", negatives="uniform", **QUIET))
    bad = Interactions(data.users, data.items, data.ratings * 2, None, data.user_ids, data.item_ids)
    first = int(np.flatnonzero(data.ratings)[0])
    with pytest.raises(ValueError, match=rf"train: row {first}: label 2.0 is not 0 or 1"):
        fit(model, bad, TrainConfig(task="click", **QUIET))
    positives = Interactions(data.users, data.items, None, None, data.user_ids, data.item_ids)
    with pytest.raises(ValueError, match="every row is a positive .* set negatives='uniform'"):
        fit(model, positives, TrainConfig(task="click", **QUIET))
    with pytest.raises(ValueError, match="data: row .* label 2.0 is not 0 or 1"):
        evaluate_pointwise(model, data, bad, task="click")


def test_positives_only_click_data_draws_negatives_when_asked():
    train, test = temporal_split(planted(), 0.25)
    positives = Interactions(train.users, train.items, None, None, train.user_ids, train.item_ids)
    model = dot_model(train)
    config = TrainConfig(task="click", negatives="uniform", epochs=12, batch_size=128, lr=0.05, **QUIET)
    history = fit(model, positives, config)
    assert history[-1]["loss"] < history[0]["loss"]
    trained = evaluate(model, train, test, ks=(10,), progress=False)
    assert (
        trained["recall@10"] > 0.6 > 2 * evaluate(Popularity(train), train, test, ks=(10,), progress=False)["recall@10"]
    )


def test_deepfm_learns_a_click_that_depends_on_item_and_context_fields():
    data = impressions(per_user=30)
    train, test = random_split(data, 0.25, seed=0)
    torch.manual_seed(0)
    config = DeepFMConfig(train.num_users, train.num_items, 8, fields=train.features.schema, hidden=(16,))
    model = DeepFM(config, features=train.features)
    history = fit(model, train, TrainConfig(task="click", epochs=10, lr=0.02, batch_size=64, **QUIET), valid=test)
    assert {"logloss", "auc", "gauc", "accuracy"} <= history[-1].keys()
    assert history[-1]["auc"] > 0.85 > history[0]["auc"]


def test_rating_classes_train_with_cross_entropy():
    train, valid = random_split(planted(n_users=60, per_user=10), 0.25, seed=0)  # ratings 2..5
    torch.manual_seed(0)
    model = RecommenderNet(
        RecommenderNetConfig(train.num_users, train.num_items, 8, classes=(2, 3, 4, 5), hidden=(16,))
    )
    history = fit(model, train, TrainConfig(loss="ce", epochs=15, lr=0.02, batch_size=64, **QUIET), valid=valid)
    assert {"mae", "mse", "rmse", "accuracy", "logloss"} <= history[-1].keys()
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["accuracy"] > 0.45  # four classes
    off = Interactions(train.users, train.items, train.ratings + 0.5, None, train.user_ids, train.item_ids)
    with pytest.raises(ValueError, match=r"train: row 0: rating \d.5 is not one of the model's rating classes"):
        fit(model, off, TrainConfig(loss="ce", **QUIET))
    with pytest.raises(ValueError, match="loss: 'ce' .* needs a RecommenderNet, got MLPModel"):
        fit(MLPModel(MLPConfig(train.num_users, train.num_items, 4)), train, TrainConfig(loss="ce", **QUIET))


def test_pointwise_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500) * 2
    labels = (rng.random(500) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    probs = 1 / (1 + np.exp(-logits))
    assert metrics.log_loss(logits, labels) == pytest.approx(sklearn_metrics.log_loss(labels, probs), rel=1e-9)
    assert metrics.auc(logits, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, logits), rel=1e-12)
    ratings = rng.integers(1, 6, 500).astype(np.float64)
    guess = ratings + rng.normal(size=500)
    assert metrics.mse(guess, ratings) == pytest.approx(sklearn_metrics.mean_squared_error(ratings, guess), rel=1e-12)
    class_logits = rng.normal(size=(500, 4))
    targets = rng.integers(0, 4, 500)
    class_probs = np.exp(class_logits) / np.exp(class_logits).sum(1, keepdims=True)
    assert metrics.cross_entropy(class_logits, targets) == pytest.approx(
        sklearn_metrics.log_loss(targets, class_probs, labels=[0, 1, 2, 3]), rel=1e-9
    )
    big = np.array([40.0, -40.0, 0.0])  # no overflow, no clipping
    assert metrics.log_loss(big, [1, 0, 1]) == pytest.approx(np.log(2) / 3 + 2 * np.log1p(np.exp(-40)) / 3)


def test_evaluate_pointwise_click_metrics_are_those_of_the_model_logits():
    data = impressions()
    train, test = random_split(data, 0.25, seed=0)
    model = DeepFM(
        DeepFMConfig(train.num_users, train.num_items, 4, fields=train.features.schema, hidden=(4,)),
        features=train.features,
    )
    got = evaluate_pointwise(model, train, test, task="click")
    context = {k: torch.from_numpy(v) for k, v in test.features.context.values.items()}
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(test.users), torch.from_numpy(test.items), context=context).numpy()
    assert got["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(test.ratings, logits), rel=1e-6)
    assert got["logloss"] == pytest.approx(sklearn_metrics.log_loss(test.ratings, 1 / (1 + np.exp(-logits))), rel=1e-5)
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(test.ratings, logits >= 0))


def test_ranker_encodes_a_raw_context_with_the_saved_vocabularies(tmp_path):
    data = impressions()
    torch.manual_seed(0)
    model = DeepFM(
        DeepFMConfig(data.num_users, data.num_items, 4, fields=data.features.schema, hidden=(4,)),
        features=data.features,
    )
    save_model_dir(tmp_path / "m", model, data)
    ranker = Ranker.load(tmp_path / "m")
    users = [3, 7]
    (evening,) = [ranker.score(users, k=5, context={"hour": 20})]
    hour = ranker.model.context_fields[0]
    rows = torch.from_numpy(hour.encode([20, 20]))
    ids, scores = rankfast.score(
        ranker.model,
        ranker.user_ids.index(users),
        k=5,
        exclude=ranker._seen(torch.tensor([3, 7])),
        context={"hour": rows},
    )
    assert [r["items"] for r in evening] == ranker.item_ids.to_raw(ids.numpy()).tolist()
    unknown = ranker.score(users, k=5, context={"hour": 3})  # hour 3 never seen: the out-of-vocabulary row
    assert unknown == ranker.score(users, k=5)
    with pytest.raises(ValueError, match=r"context: \['weather'\] are not context fields"):
        ranker.score(users, context={"weather": "rain"})


def test_movielens_click_task(ml_latest_small):
    data = ml_latest_small.clicks(4.0)
    train, test = random_split(data, 0.2, seed=0)
    torch.manual_seed(0)
    config = DeepFMConfig(train.num_users, train.num_items, 16, fields=train.features.schema, hidden=(64,))
    model = DeepFM(config, features=train.features)
    torch.set_num_threads(1)
    fit(model, train, TrainConfig(task="click", epochs=1, batch_size=512, lr=2e-3, **QUIET))
    got = evaluate_pointwise(model, train, test, task="click")
    assert got["auc"] > 0.76 and got["logloss"] < 0.6  # one epoch; bench/bench_ctr.py trains on
