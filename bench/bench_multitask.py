"""Multi-task against single-task ranking on MovieLens ml-latest-small (a script, not a test).

The same DotModel (dim 64, sampled softmax over 32 popularity negatives) trains alone
and inside ``rankfast.train.MultiTask`` (a rating head on the shared embeddings) with
each rating weight of a grid. Split as in bench_quality: per-user temporal 80/20;
each user's last 10% of training interactions are a validation split on which the
rating weight and the number of epochs are chosen (validation NDCG@20 at the end of a
run); the chosen settings are retrained from scratch on the whole training split and
evaluated once on the test split: NDCG@20 / Recall@20 of the ranking and RMSE of the
rating head on the test ratings, averaged over ``--seeds`` seeds (initial weights, data
order, negatives). Each number of epochs of the grid is its own run, its cosine
learning-rate schedule spanning that many epochs, so that a test run repeats the
schedule of the validation run that chose it.

    python bench/bench_multitask.py [--weights 1 0.3 0.1 0.03] [--epochs 4 6 8 10 12 16] [--seeds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import rankfast
from rankfast import datasets
from rankfast.data import temporal_split
from rankfast.evaluate import evaluate, evaluate_pointwise
from rankfast.models import DotConfig, DotModel
from rankfast.train import MultiTask, TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
TRAINING = dict(loss="softmax", negatives="popularity", negative_alpha=1.0, num_negatives=32, lr=1e-2, batch_size=2048)


def build(data, weight, seed=0):
    torch.manual_seed(seed)
    base = DotModel(DotConfig(num_users=data.num_users, num_items=data.num_items, dim=64))
    return base, (base if weight is None else MultiTask(base, rating_weight=weight))


def run(data, weight, epochs, seed=0):
    """``(base, model)`` trained on ``data`` for ``epochs`` (the schedule spanning them)."""
    base, model = build(data, weight, seed)
    fit(model, data, TrainConfig(progress=False, seed=seed, **{**TRAINING, "epochs": epochs}))
    return base, model


def scores(base, model, train, held_out, weight):
    """``(NDCG@20, Recall@20, rating RMSE or None)`` on ``held_out``."""
    ranking = evaluate(base, train, held_out, ks=(20,), progress=False)
    rmse = None if weight is None else evaluate_pointwise(model, train, held_out, task="rating")["rmse"]
    return ranking["ndcg@20"], ranking["recall@20"], rmse


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-latest-small")
    parser.add_argument("--weights", type=float, nargs="*", default=[1.0, 0.3, 0.1, 0.03])
    parser.add_argument("--epochs", type=int, nargs="*", default=[4, 6, 8, 10, 12, 16])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the test runs (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multitask-ml-latest-small.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    train, test = temporal_split(datasets.load(args.data), 0.2)
    part, valid = temporal_split(train, 0.1)
    selection = []  # (weight, epochs, valid NDCG@20, valid RMSE)
    for weight in [None, *args.weights]:
        for epochs in args.epochs:
            ndcg, _, rmse = scores(*run(part, weight, epochs), part, valid, weight)
            selection.append((weight, epochs, ndcg, rmse))
            print(f"selection: rating weight {weight}, {epochs} epochs: valid NDCG@20 {ndcg:.4f}", flush=True)
    best = lambda rows: max(rows, key=lambda s: s[2])  # noqa: E731
    single_choice = best(s for s in selection if s[0] is None)
    chosen = best(s for s in selection if s[0] is not None)
    rows = []
    for weight, epochs, *_ in (single_choice, chosen):
        started = time.perf_counter()
        ndcg, recall, rmse = [], [], []
        for seed in range(args.seeds):
            n, r, m = scores(*run(train, weight, epochs, seed), train, test, weight)
            ndcg.append(n)
            recall.append(r)
            if m is not None:
                rmse.append(m)
            print(f"test: rating weight {weight}, seed {seed}: NDCG@20 {n:.4f} RMSE {m}", flush=True)
        seconds = (time.perf_counter() - started) / args.seeds
        mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
        spread = ", ".join(f"{v:.4f}" for v in ndcg)
        rows.append((weight, epochs, mean(ndcg), mean(recall), mean(rmse), seconds, spread))
    single = rows[0][2]
    met = rows[1][2] >= single
    lines = [
        "# Multi-task (ranking + rating head) against single-task ranking: ml-latest-small",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, 1 torch thread, torch {torch.__version__}, "
        f"rankfast {rankfast.__version__}, load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f}. "
        "`python bench/bench_multitask.py` reruns it.",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        f" Training: {TRAINING}.",
        "",
        "Selection (validation split):",
        "",
        "| rating weight | epochs | valid NDCG@20 | valid RMSE |",
        "| --- | --- | --- | --- |",
        *(
            f"| {'single-task' if w is None else w} | {e} | {n:.4f} | {'-' if r is None else f'{r:.4f}'} |"
            for w, e, n, r in selection
        ),
        "",
        f"Test (retrained on the whole training split; means over {args.seeds} seeds):",
        "",
        "| model | epochs | NDCG@20 | Recall@20 | rating RMSE | seconds a run | NDCG@20 by seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {'single-task' if w is None else f'MultiTask, rating_weight={w}'} | {e} | {n:.4f} | {r:.4f} | "
            f"{'-' if m is None else f'{m:.4f}'} | {s:.0f} | {spread} |"
            for w, e, n, r, m, s, spread in rows
        ),
        "",
        f"Target (the chosen multi-task model's NDCG@20 at least the single-task model's): {'met' if met else 'MISSED'}"
        f" ({rows[1][2]:.4f} vs {single:.4f}).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
