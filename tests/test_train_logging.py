"""What fit reports while it runs: a log line per epoch, TensorBoard scalars, and
validation by the sampled (leave-one-out) protocol."""

import logging
import sys

import pytest
import torch

from rankfast.data import temporal_split
from rankfast.evaluate import evaluate_sampled
from rankfast.train import TrainConfig, fit

from helpers import QUIET, dot_model, planted


@pytest.fixture(scope="module")
def split():
    return temporal_split(planted(n_users=40, per_user=8), 0.25)


def test_each_epoch_is_one_log_line(split, caplog):
    train, valid = split
    with caplog.at_level(logging.INFO, logger="rankfast.train"):
        history = fit(dot_model(train, dim=8), train, TrainConfig(epochs=2, lr=0.05, **QUIET), valid=valid)
    lines = [r.getMessage() for r in caplog.records if r.name == "rankfast.train.loop"]
    assert len(lines) == 2
    for line, record in zip(lines, history, strict=True):
        assert line.startswith(f"epoch {record['epoch']}/2: loss {record['loss']:.4f}, lr ")
        assert f"ndcg@20 {record['ndcg@20']:.4f}" in line and f"recall@10 {record['recall@10']:.4f}" in line
        assert line.endswith(f", {record['seconds']:.1f} s")


def test_tensorboard_scalars_per_epoch(split, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, valid = split
    config = TrainConfig(epochs=3, lr=0.05, log_dir=str(tmp_path / "tb"), **QUIET)
    history = fit(dot_model(train, dim=8), train, config, valid=valid)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "valid/ndcg@20", "valid/recall@10", "valid/mrr"} <= set(events.Tags()["scalars"])
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("valid/ndcg@20", "ndcg@20")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in history], rel=1e-6)  # float32 events


def test_log_dir_without_tensorboard_is_a_clear_error(split, tmp_path, monkeypatch):
    train, _ = split
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    model = dot_model(train, dim=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ImportError, match=r'log_dir: .*pip install "rankfast\[tensorboard\]"'):
        fit(model, train, TrainConfig(epochs=1, log_dir=str(tmp_path / "tb"), **QUIET))
    assert not (tmp_path / "tb").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing trained


def test_sampled_validation_monitors_hit_rate(split):
    train, valid = split
    config = TrainConfig(
        epochs=3, lr=0.05, valid_protocol="sampled", valid_num_negatives=20, eval_ks=(5,), monitor="hr@5", **QUIET
    )
    model = dot_model(train, dim=8)
    history = fit(model, train, config, valid=valid)
    assert {"hr@5", "ndcg@5", "mrr", "auc"} <= history[0].keys() and "recall@5" not in history[0]
    best = max(history, key=lambda r: r["hr@5"])  # the weights fit restores
    again = evaluate_sampled(model, train, valid, num_negatives=20, ks=(5,), seed=config.seed)
    assert again == pytest.approx({k: best[k] for k in again})


def test_validation_settings_are_checked():
    with pytest.raises(ValueError, match="valid_protocol: expected one of"):
        TrainConfig(valid_protocol="loo")
    with pytest.raises(ValueError, match="valid_num_negatives: must be at least 1"):
        TrainConfig(valid_num_negatives=0)
