"""Quality benchmark on MovieLens ml-latest-small (a script, not a test).

Protocol: each user's last 20% of ratings by
timestamp are the test set, every rating counts as a positive, full ranking
over all items with the user's training items excluded, Recall@20 (hits over
min(|test|, 20)) and NDCG@20. Reports popularity, EASE^R (lambda 100) and
each rankfast model, trained on the CPU, with its training time. "DotModel
(history)" is an item-based user tower: the user's row is their training
history through a learned projection; it trains on the binary history and
scores with the history weighted by recency (``history_features``'
``half_life``). EASE^R scored from the same recency-weighted history is the
yardstick of issue 17 (plain EASE^R that of the earlier issue); implicit-feedback
ALS (``rankfast.baselines.ALS``, settings chosen by ``bench_peers.py``) is the
plain matrix factorization beside them. "SASRec" is the sequential model: causal
self-attention over the user's last items, trained on next-item targets. "ItemItem" is
EASE^R's form learned by gradient descent: it starts from EASE^R's weights (lambda 300,
fitted on the binary rows of the data it trains on; that start, scored alone, is a row
too) and is fine-tuned with the full softmax on the recency-weighted history it is scored
with.

    python bench/bench_quality.py [--data ml-latest-small] [--out bench/results/quality-ml-latest-small.md]

``--data`` is a name of ``rankfast.datasets`` (read from ``$RANKFAST_DATA``,
downloaded there once if missing) or a MovieLens directory.

Model selection never sees the test split: each user's last 10% of their
training interactions (by time) are a validation split; a model trains on
the rest with early stopping on validation NDCG@20, then is retrained from
scratch on the whole training split for the best epoch count, and only that
retrained model is evaluated on the test split. The hyperparameters below
were chosen on the validation split the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from rankfast import datasets
from rankfast.baselines import ALS, EASE, Popularity
from rankfast.data import history_features, temporal_split
from rankfast.ensemble import Blend
from rankfast.evaluate import evaluate
from rankfast.models import (
    AttentionConfig,
    AttentionModel,
    DotConfig,
    DotModel,
    ItemItem,
    ItemItemConfig,
    MLPConfig,
    MLPModel,
    NeuMF,
    NeuMFConfig,
    SASRec,
    SASRecConfig,
)
from rankfast.train import TrainConfig, fit


def rankfast_version():
    try:
        from importlib.metadata import version

        return version("rankfast")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "(source tree)"


REPO = Path(__file__).resolve().parents[1]
#: Each user's last 10% of training interactions: the validation split for model selection.
VALID_RATIO = 0.1
PATIENCE = 3

#: name -> (model class, config class, model fields, training fields); the training
#: fields may override batch_size (1024) and patience (PATIENCE; None runs every epoch).
MODELS = {
    "DotModel": (
        DotModel,
        DotConfig,
        {"dim": 256},
        {
            "epochs": 30,
            "loss": "softmax",
            "negatives": "all",
            "lr": 0.1,
            "weight_decay": 0.3,
            "batch_size": 8192,
            "patience": None,
        },
    ),
    "DotModel (history)": (
        DotModel,
        DotConfig,
        {"dim": 256},
        {
            "epochs": 30,
            "loss": "softmax",
            "negatives": "all",
            "lr": 0.03,
            "weight_decay": 0.0,
            "batch_size": 8192,
            "patience": None,
        },
    ),
    "MLPModel": (
        MLPModel,
        MLPConfig,
        {"dim": 64, "hidden": (128, 64)},
        {
            "epochs": 15,
            "loss": "softmax",
            "negatives": "popularity",
            "negative_alpha": 1.0,
            "num_negatives": 32,
            "lr": 3e-3,
        },
    ),
    "NeuMF": (
        NeuMF,
        NeuMFConfig,
        {"dim": 32, "hidden": (64, 32)},
        {
            "epochs": 12,
            "loss": "softmax",
            "negatives": "popularity",
            "negative_alpha": 1.0,
            "num_negatives": 32,
            "lr": 3e-3,
        },
    ),
    "AttentionModel": (
        AttentionModel,
        AttentionConfig,
        {"dim": 32, "hidden": (64,), "unit_hidden": (32,)},
        {
            "epochs": 6,
            "loss": "softmax",
            "negatives": "popularity",
            "negative_alpha": 1.0,
            "num_negatives": 16,
            "lr": 3e-3,
            "max_history": 20,
        },
    ),
    "SASRec": (
        SASRec,
        SASRecConfig,
        {"dim": 64, "max_len": 50, "num_layers": 2, "num_heads": 1, "dropout": 0.2},
        {
            "epochs": 10,
            "loss": "softmax",
            "negatives": "all",
            "lr": 3e-3,
            "batch_size": 1024,
            "max_history": 50,
        },
    ),
    "ItemItem": (
        ItemItem,
        ItemItemConfig,
        {},
        {"epochs": 4, "loss": "softmax", "negatives": "all", "lr": 3e-5, "batch_size": 8192},
    ),
}

#: Models whose user features are the history of the data they train on: binary while
#: training, then weighted by recency for scoring (these ``history_features`` arguments,
#: chosen on the validation split). The selection run takes the history from the training
#: split less the validation split; the retrained model, and so the test evaluation, from
#: the whole training split.
HISTORY_USERS = {"DotModel (history)": {"half_life": 5.0, "floor": 0.1}}
#: Models that start from EASE^R's item-item weights (``ease_weights`` with this lambda) fitted on
#: the binary rows of the data they train on, and train and score with that data's history weighted
#: by recency (these ``history_features`` arguments, chosen on the validation split).
EASE_STARTS = {"ItemItem": (300.0, {"half_life": 5.0, "floor": 0.1})}
#: The yardsticks: plain EASE^R (the earlier issue's), EASE^R scored from recency-weighted rows (issue 17's).
YARDSTICK = "EASE^R l=100"
RECENCY_YARDSTICK = f"{YARDSTICK}, recency-weighted history"
#: implicit-feedback ALS, with the settings bench_peers.py chose on the validation split.
ALS_SETTINGS = {"factors": 256, "reg": 10.0, "alpha": 0.0, "iterations": 15}
#: A blend of two trained models (``rankfast.ensemble.Blend``): the first's scores plus a
#: weight, chosen on the validation split from BLEND_WEIGHTS, times the second's.
BLEND = ("DotModel (history)", "SASRec")
BLEND_NAME = f"Blend: {BLEND[0]} + w * {BLEND[1]}"
BLEND_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


def verdict(rows) -> str:
    """The targets: the best learned model at or above each yardstick on both metrics."""
    models = [r for r in rows if r[0] in MODELS or r[0] == BLEND_NAME]
    lines = []
    for yardstick in (YARDSTICK, RECENCY_YARDSTICK):
        ease = next((r for r in rows if r[0] == yardstick), None)
        if ease is None or not models:
            lines.append(f"Target ({yardstick}): not assessed (needs it and at least one model).")
            continue
        best = max(models, key=lambda r: (r[1] >= ease[1] and r[2] >= ease[2], r[2]))
        met = best[1] >= ease[1] and best[2] >= ease[2]
        lines.append(
            f"Target (best model at or above {yardstick} on Recall@20 and NDCG@20): {'met' if met else 'MISSED'}; "
            f"best model {best[0]} {best[1]:.4f} / {best[2]:.4f} vs {ease[1]:.4f} / {ease[2]:.4f}."
        )
    return "\n\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="ml-latest-small",
        help="a MovieLens name (read from $RANKFAST_DATA, downloaded there if missing) or directory",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality-ml-latest-small.md")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    load = os.getloadavg()
    train, test = temporal_split(datasets.load(args.data), 0.2)
    rows = []

    def report(name, metrics, seconds, note=""):
        rows.append((name, metrics["recall@20"], metrics["ndcg@20"], seconds, note))
        print(
            f"{name:18s} Recall@20 {metrics['recall@20']:.4f}  NDCG@20 {metrics['ndcg@20']:.4f}  {seconds:7.1f} s  "
            f"{note}",
            flush=True,
        )

    recency = HISTORY_USERS["DotModel (history)"]
    baselines = (
        ("popularity", lambda: Popularity(train)),
        (YARDSTICK, lambda: EASE(train, lam=100.0)),
        (RECENCY_YARDSTICK, lambda: EASE(train, lam=100.0, history=history_features(train, **recency))),
        (f"ALS {ALS_SETTINGS['factors']} factors", lambda: ALS(train, **ALS_SETTINGS)),
        *(  # a learned model's closed-form start, scored as the model is: what its training adds
            (
                f"EASE^R l={lam:g}, history_features({weighting}): {name}'s start",
                lambda lam=lam, weighting=weighting: EASE(train, lam=lam, history=history_features(train, **weighting)),
            )
            for name, (lam, weighting) in EASE_STARTS.items()
        ),
    )
    for name, build in baselines:
        started = time.perf_counter()
        baseline = build()
        seconds = time.perf_counter() - started
        report(name, evaluate(baseline, train, test, ks=(20,), progress=False), seconds)

    fit_part, valid = temporal_split(train, VALID_RATIO)
    selected, finals, seconds_of = {}, {}, {}  # the selection and final models, by name
    for name in args.models:
        model_cls, config_cls, fields, training = MODELS[name]

        def build(data):
            torch.manual_seed(0)
            if name in EASE_STARTS:
                lam, weighting = EASE_STARTS[name]
                config = config_cls(num_users=train.num_users, num_items=train.num_items, **fields)
                return model_cls.from_interactions(config, data, ease_lambda=lam, **weighting)
            if name not in HISTORY_USERS:
                return model_cls(config_cls(num_users=train.num_users, num_items=train.num_items, **fields))
            config = config_cls(
                num_users=train.num_users, num_items=train.num_items, user_feature_dim=train.num_items, **fields
            )
            return model_cls(config, user_features=history_features(data))

        def serve(model, data):
            """History users score with their recency-weighted history (ItemItem trains on it too); returns a note."""
            if name in EASE_STARTS:
                lam, weighting = EASE_STARTS[name]
                return f"; from ease_weights(lam={lam}), trained and scored with history_features({weighting})"
            if name not in HISTORY_USERS:
                return ""
            model.user_repr.set_features(history_features(data, **HISTORY_USERS[name]))
            weighting = HISTORY_USERS[name]
            return f"; scored with history_features(half_life={weighting['half_life']}, floor={weighting['floor']})"

        # 1. Choose the epoch count on the validation split (carved from train).
        options = {"batch_size": 1024, "patience": PATIENCE, **training}
        config = TrainConfig(eval_ks=(20,), progress=False, **options)
        started = time.perf_counter()
        selection_model = build(fit_part)
        history = fit(selection_model, fit_part, config, valid=valid)
        select_seconds = time.perf_counter() - started
        best = max(history, key=lambda r: r["ndcg@20"])
        served = ""
        if name in HISTORY_USERS:  # the selection model at its last epoch, scored as the final one will be
            serve(selection_model, fit_part)
            recent = evaluate(selection_model, fit_part, valid, ks=(20,), progress=False)
            served = f" (binary history; recency-weighted at epoch {len(history)}: {recent['ndcg@20']:.4f})"
        # 2. Retrain on all of train for that many epochs (the schedule spans them); evaluate once on test.
        final = dataclasses.replace(config, epochs=best["epoch"], patience=None)
        started = time.perf_counter()  # building counts: ItemItem's start is EASE^R's closed form
        model = build(train)
        fit(model, train, final)
        seconds = time.perf_counter() - started
        serving = serve(model, train)
        selected[name], finals[name], seconds_of[name] = selection_model, model, seconds
        report(
            name,
            evaluate(model, train, test, ks=(20,), max_history=config.max_history, progress=False),
            seconds,
            f"valid NDCG@20 {best['ndcg@20']:.4f} at epoch {best['epoch']} of {len(history)}{served} "
            f"(selection run {select_seconds:.0f} s); {fields}; {training}{serving}",
        )

    if all(name in finals for name in BLEND):
        # 3. The blend of two trained models: its weight chosen on validation with the selection models.
        first, second = BLEND
        max_history = MODELS[second][3].get("max_history", 50)
        tried = []
        for weight in BLEND_WEIGHTS:
            blend = Blend([selected[first], selected[second]], [1.0, weight], fit_part, max_history=max_history)
            tried.append((evaluate(blend, fit_part, valid, ks=(20,), progress=False)["ndcg@20"], weight))
        best_valid, weight = max(tried)
        blend = Blend([finals[first], finals[second]], [1.0, weight], train, max_history=max_history)
        report(
            BLEND_NAME,
            evaluate(blend, train, test, ks=(20,), progress=False),
            seconds_of[first] + seconds_of[second],
            f"w = {weight} (valid NDCG@20 {best_valid:.4f}; of {BLEND_WEIGHTS}: "
            + ", ".join(f"{v:.4f}" for v, _ in tried)
            + "); the two models above, unchanged; seconds: their two trainings",
        )

    lines = [
        "# Quality: ml-latest-small, per-user temporal 80/20, full ranking",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, rankfast {rankfast_version()}, "
        f"load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f} (2 shared cores: timings are noisy).",
        "",
        "Model selection never sees the test split. Each user's last 10% of training interactions "
        "(by time) are a validation split; a model trains on the rest with early stopping on validation "
        f"NDCG@20 (patience {PATIENCE} epochs unless the notes say otherwise), then is retrained from scratch on the "
        "whole training split for the "
        "best epoch count, and that model alone is evaluated on the test split. Hyperparameters were chosen "
        "on the validation split. seconds: fitting (baselines) or the final retraining (models); the "
        "selection run's time is in the notes.",
        "",
        "| model | Recall@20 | NDCG@20 | seconds | notes |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {n} | {r:.4f} | {g:.4f} | {s:.1f} | {note} |" for n, r, g, s, note in rows),
        "",
        verdict(rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
