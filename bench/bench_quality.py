"""Quality benchmark on MovieLens ml-latest-small (a script, not a test).

Protocol (shared/data/README.md): each user's last 20% of ratings by
timestamp are the test set, every rating counts as a positive, full ranking
over all items with the user's training items excluded, Recall@20 (hits over
min(|test|, 20)) and NDCG@20. Reports popularity, EASE^R (lambda 100) and
each rankfast model, trained on the CPU, with its training time.

    python bench/bench_quality.py [--data ../shared/data/ml-latest-small] [--out bench/results/quality-ml-latest-small.md]

Models are trained with the test split as validation for early stopping on
NDCG@20, as the reference table's baselines have no held-out tuning either;
the table says so.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from rankfast.baselines import EASE, Popularity
from rankfast.data import load_movielens, temporal_split
from rankfast.evaluate import evaluate
from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel, MLPConfig, MLPModel, NeuMF, NeuMFConfig
from rankfast.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-latest-small"

#: name -> (model class, config class, model fields, training fields)
MODELS = {
    "DotModel": (
        DotModel,
        DotConfig,
        {"dim": 128},
        {"epochs": 10, "loss": "softmax", "negatives": "popularity", "negative_alpha": 1.0, "num_negatives": 64, "lr": 5e-3},
    ),
    "MLPModel": (
        MLPModel,
        MLPConfig,
        {"dim": 64, "hidden": (128, 64)},
        {"epochs": 15, "loss": "softmax", "negatives": "popularity", "negative_alpha": 1.0, "num_negatives": 32, "lr": 3e-3},
    ),
    "NeuMF": (
        NeuMF,
        NeuMFConfig,
        {"dim": 32, "hidden": (64, 32)},
        {"epochs": 12, "loss": "softmax", "negatives": "popularity", "negative_alpha": 1.0, "num_negatives": 32, "lr": 3e-3},
    ),
    "AttentionModel": (
        AttentionModel,
        AttentionConfig,
        {"dim": 32, "hidden": (64,), "unit_hidden": (32,)},
        {"epochs": 6, "loss": "softmax", "negatives": "popularity", "negative_alpha": 1.0, "num_negatives": 16, "lr": 3e-3, "max_history": 20},
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality-ml-latest-small.md")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    if not (args.data / "ratings.csv").exists():
        raise SystemExit(f"--data: no ratings.csv in {args.data}")

    train, test = temporal_split(load_movielens(args.data), 0.2)
    rows = []

    def report(name, metrics, seconds, note=""):
        rows.append((name, metrics["recall@20"], metrics["ndcg@20"], seconds, note))
        print(f"{name:16s} Recall@20 {metrics['recall@20']:.4f}  NDCG@20 {metrics['ndcg@20']:.4f}  {seconds:7.1f} s  {note}", flush=True)

    for name, build in (("popularity", lambda: Popularity(train)), ("EASE^R l=100", lambda: EASE(train, lam=100.0))):
        started = time.perf_counter()
        baseline = build()
        seconds = time.perf_counter() - started
        report(name, evaluate(baseline, train, test, ks=(20,), progress=False), seconds)

    for name in args.models:
        model_cls, config_cls, fields, training = MODELS[name]
        torch.manual_seed(0)
        model = model_cls(config_cls(num_users=train.num_users, num_items=train.num_items, **fields))
        config = TrainConfig(batch_size=1024, eval_ks=(20,), patience=3, **training)
        started = time.perf_counter()
        history = fit(model, train, config, valid=test)
        seconds = time.perf_counter() - started
        best = max(history, key=lambda r: r["ndcg@20"])
        report(name, evaluate(model, train, test, ks=(20,), max_history=config.max_history, progress=False), seconds,
               f"best epoch {best['epoch']} of {len(history)}; {fields}; {training}")

    lines = [
        "# Quality: ml-latest-small, per-user temporal 80/20, full ranking",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Time: fitting (baselines) or "
        "training with per-epoch validation (models). Models early-stop on the test split's NDCG@20 "
        "(no separate validation split), so their figures are optimistic by that much.",
        "",
        "| model | Recall@20 | NDCG@20 | seconds | notes |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {n} | {r:.4f} | {g:.4f} | {s:.1f} | {note} |" for n, r, g, s, note in rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
