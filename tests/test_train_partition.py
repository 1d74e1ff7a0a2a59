"""The partitioned full softmax (``negatives="partition"``): each epoch the catalogue
is cut into random parts, a step is one part with its items' interactions.

References are written independently: per-pair forwards and ``F.cross_entropy``,
the hand-written full-softmax step, and counts of the texts an attached encoder sees.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankfast.baselines import Popularity
from rankfast.data import temporal_split
from rankfast.evaluate import evaluate
from rankfast.train import TrainConfig, fit
from rankfast.train.batching import Partition

from helpers import QUIET, assert_same, dot_model, params, planted


def test_each_epoch_partitions_the_catalogue_and_each_step_is_the_softmax_over_its_part(monkeypatch):
    data = planted(n_users=30, n_items=23, per_user=6)
    model = dot_model(data, dim=4)
    with torch.no_grad():
        model.item_bias.normal_()
    size, epochs = 5, 2
    steps, current = [], {}
    real_loss, real_batches = Partition.loss, Partition.micro_batches

    def spying_batches(self, epoch):
        current["epoch"] = epoch
        return real_batches(self, epoch)

    def spying_loss(self, net, idx, negatives):
        # Reference: every interaction's user scored pair by pair against the part's items.
        members = negatives.tolist()
        users, items = data.users[idx.numpy()], data.items[idx.numpy()]
        with torch.no_grad():
            logits = (
                torch.stack([model(torch.full((len(members),), int(u)), torch.tensor(members)) for u in users])
                if len(users)
                else None
            )
            targets = torch.tensor([members.index(int(i)) for i in items])
            expected = float(F.cross_entropy(logits, targets)) if len(users) else 0.0
        loss = real_loss(self, net, idx, negatives)
        steps.append((current["epoch"], idx.clone(), members))
        assert abs(float(loss.detach()) - expected) < 1e-5
        return loss

    monkeypatch.setattr(Partition, "loss", spying_loss)
    monkeypatch.setattr(Partition, "micro_batches", spying_batches)
    config = TrainConfig(epochs=epochs, loss="softmax", negatives="partition", num_negatives=size, lr=0.05, **QUIET)
    history = fit(model, data, config)
    assert len(steps) == epochs * -(-data.num_items // size)
    parts_of_epoch = []
    for epoch in range(1, epochs + 1):
        mine = [(idx, members) for e, idx, members in steps if e == epoch]
        members = [m for _, m in mine]
        assert sorted(i for m in members for i in m) == list(range(data.num_items))  # a partition
        assert sorted(len(m) for m in members) == [data.num_items % size] + [size] * (data.num_items // size)
        seen = np.concatenate([idx.numpy() for idx, _ in mine])
        assert sorted(seen.tolist()) == list(range(len(data)))  # each interaction once
        for idx, m in mine:
            assert set(data.items[idx.numpy()].tolist()) <= set(m)
        parts_of_epoch.append(sorted(tuple(m) for m in members))
    assert parts_of_epoch[0] != parts_of_epoch[1], "the parts are redrawn every epoch"
    assert np.isfinite([h["loss"] for h in history]).all()


def test_partition_training_resumes_exactly(tmp_path):
    data = planted(n_users=40, per_user=8)
    base = {
        "loss": "softmax",
        "negatives": "partition",
        "num_negatives": 16,
        "optimizer": "sgd",
        "lr": 0.5,
        "schedule": "constant",
        **QUIET,
    }
    straight = dot_model(data)
    fit(straight, data, TrainConfig(epochs=3, **base))
    resumed = dot_model(data)
    fit(resumed, data, TrainConfig(epochs=1, checkpoint_dir=str(tmp_path), **base))
    resumed = dot_model(data)
    fit(resumed, data, TrainConfig(epochs=3, checkpoint_dir=str(tmp_path), **base))
    assert_same(params(straight), params(resumed), rtol=0, atol=0)


def test_partition_training_beats_popularity():
    train, test = temporal_split(planted(), 0.25)
    model = dot_model(train)
    fit(model, train, TrainConfig(epochs=12, lr=0.05, loss="softmax", negatives="partition", num_negatives=20, **QUIET))
    trained = evaluate(model, train, test, ks=(10,), progress=False)
    baseline = evaluate(Popularity(train), train, test, ks=(10,), progress=False)
    assert trained["recall@10"] > 0.6 and trained["recall@10"] > 2 * baseline["recall@10"]


def test_partition_argument_errors():
    with pytest.raises(ValueError, match="negatives: 'partition' .* needs loss='softmax'"):
        TrainConfig(loss="bce", negatives="partition")
    with pytest.raises(ValueError, match="num_negatives"):
        TrainConfig(loss="softmax", negatives="partition", num_negatives=0)
