"""rankfast beside implicit, the library people use for implicit feedback (a script, not a test).

The split and metrics of ``bench_quality.py``: each user's last 20% of ratings by timestamp
are the test set, full ranking over all items with the user's training items excluded,
Recall@20 and NDCG@20. Each model's settings are chosen on the validation split carved from
train (each user's last 10% of training interactions) by NDCG@20 over a small grid, then the
model is refitted on the whole training split with them and evaluated once on the test split;
seconds is that final fit. Models: implicit's AlternatingLeastSquares,
BayesianPersonalizedRanking and item-KNN (CosineRecommender, BM25Recommender), and
rankfast's ``baselines.ALS``.

    pip install implicit   # a bench-only dependency: rankfast never imports it
    python bench/bench_peers.py [--data ml-latest-small] [--out bench/results/peers-ml-latest-small.md]

implicit runs on its own threads (all cores) with ``OPENBLAS_NUM_THREADS=1``, as it asks;
rankfast's ALS runs on one torch thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS; implicit warns otherwise

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from rankfast import datasets  # noqa: E402
from rankfast.baselines import ALS  # noqa: E402
from rankfast.data import temporal_split  # noqa: E402
from rankfast.evaluate import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VALID_RATIO = 0.1


class Implicit:
    """An implicit model behind the ``recommend(users, k, exclude=)`` call of
    :func:`rankfast.evaluate.evaluate`: implicit's own batched ``recommend``, which leaves out
    the user's training items (the same items ``evaluate`` excludes)."""

    def __init__(self, model, train):
        indptr, items = train.user_items()
        self.user_items = sp.csr_matrix(
            (np.ones(len(items), dtype=np.float32), items, indptr), shape=(train.num_users, train.num_items)
        )
        self.model = model
        self.model.fit(self.user_items, show_progress=False)

    def recommend(self, users, k, *, exclude=None):
        users = np.asarray(users)
        ids, scores = self.model.recommend(users, self.user_items[users], N=k, filter_already_liked_items=True)
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)), torch.from_numpy(np.asarray(scores))


def _implicit(name):
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    return {
        "implicit ALS": lambda **kw: AlternatingLeastSquares(random_state=0, **kw),
        "implicit BPR": lambda **kw: BayesianPersonalizedRanking(random_state=0, **kw),
        "implicit item-KNN (cosine)": CosineRecommender,
        "implicit item-KNN (BM25)": BM25Recommender,
    }[name]


#: name -> (how to fit on an Interactions with settings, the grid of settings)
GRIDS = {
    "implicit ALS": dict(
        factors=[256], regularization=[1.0, 10.0, 50.0, 200.0], alpha=[1.0, 10.0, 40.0, 100.0], iterations=[15]
    ),
    "implicit BPR": dict(factors=[64, 128], learning_rate=[0.01, 0.05], regularization=[0.01], iterations=[100]),
    "implicit item-KNN (cosine)": dict(K=[20, 50, 200]),
    "implicit item-KNN (BM25)": dict(K=[20, 50, 200]),
    "rankfast ALS": dict(factors=[256], reg=[1.0, 10.0, 50.0, 200.0], alpha=[0.0, 9.0, 39.0, 99.0], iterations=[15]),
}


#: implicit's confidence on a binary matrix is its alpha, rankfast's 1 + alpha: the grids match.
ALPHA_OFFSET = 1.0


def fit(name, data, settings):
    if name == "rankfast ALS":
        return ALS(data, **settings)
    return Implicit(_implicit(name)(**settings), data)


def grid(name):
    keys = list(GRIDS[name])
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(GRIDS[name][k] for k in keys))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-latest-small", help="a MovieLens name or directory")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "peers-ml-latest-small.md")
    parser.add_argument("--models", nargs="*", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args()
    torch.set_num_threads(1)

    load = os.getloadavg()
    train, test = temporal_split(datasets.load(args.data), 0.2)
    fit_part, valid = temporal_split(train, VALID_RATIO)
    rows = []
    for name in args.models:
        started = time.perf_counter()
        tried = []
        for settings in grid(name):
            metrics = evaluate(fit(name, fit_part, settings), fit_part, valid, ks=(20,), progress=False)
            tried.append((metrics["ndcg@20"], settings))
        best_valid, best = max(tried, key=lambda t: t[0])
        select_seconds = time.perf_counter() - started
        started = time.perf_counter()
        model = fit(name, train, best)
        seconds = time.perf_counter() - started
        metrics = evaluate(model, train, test, ks=(20,), progress=False)
        note = f"{best}; valid NDCG@20 {best_valid:.4f}, best of {len(tried)} (selection {select_seconds:.0f} s)"
        rows.append((name, metrics["recall@20"], metrics["ndcg@20"], seconds, note, best))
        print(f"{name:28s} {metrics['recall@20']:.4f} {metrics['ndcg@20']:.4f} {seconds:6.2f} s  {note}", flush=True)
    chosen = {row[0]: row[5] for row in rows}
    if "implicit ALS" in chosen and "rankfast ALS" in args.models:
        # Equal work: rankfast's ALS with the settings chosen for implicit's, the same objective.
        theirs = chosen["implicit ALS"]
        settings = {
            "factors": theirs["factors"],
            "reg": theirs["regularization"],
            "alpha": theirs["alpha"] - ALPHA_OFFSET,
            "iterations": theirs["iterations"],
        }
        started = time.perf_counter()
        model = fit("rankfast ALS", train, settings)
        seconds = time.perf_counter() - started
        metrics = evaluate(model, train, test, ks=(20,), progress=False)
        label, note = "rankfast ALS, implicit ALS's settings", f"{settings}; the objective implicit ALS was fitted with"
        rows.append((label, metrics["recall@20"], metrics["ndcg@20"], seconds, note, settings))
        print(f"{label:28s} {metrics['recall@20']:.4f} {metrics['ndcg@20']:.4f} {seconds:6.2f} s  {note}", flush=True)

    lines = [
        "# rankfast beside implicit: ml-latest-small, per-user temporal 80/20, full ranking",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"implicit {version('implicit')} (its own threads, OPENBLAS_NUM_THREADS="
        f"{os.environ['OPENBLAS_NUM_THREADS']}), rankfast on 1 torch thread, torch {torch.__version__}, "
        f"load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f} (shared cores: timings are noisy).",
        "",
        "Settings chosen on the validation split (each user's last 10% of training interactions) by "
        "NDCG@20 over the grid in `bench/bench_peers.py`; the model is then refitted on the whole training "
        "split and evaluated once on the test split. seconds: that final fit.",
        "",
        "| model | Recall@20 | NDCG@20 | seconds | settings |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {n} | {r:.4f} | {g:.4f} | {s:.2f} | {note} |" for n, r, g, s, note, _ in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
