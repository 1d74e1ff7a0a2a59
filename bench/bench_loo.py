"""Leave-one-out with sampled negatives on MovieLens ml-latest-small, the protocol of the
NCF paper (a script, not a test).

Every rating is a positive. Each user's last interaction (by time) is the test item,
ranked among 99 items the user never rated (drawn once from seed 0): HR@10 and NDCG@10.
Settings are chosen on a validation item per user, the last of its training
interactions: a model trains on the rest, monitored by the same sampled protocol
(``TrainConfig(valid_protocol="sampled")``, NDCG@10, early stopping), then is retrained
from scratch on all training interactions for the chosen number of epochs and
evaluated once on the test items. EASE^R's lambda is chosen on the validation items too.

    python bench/bench_loo.py [--data ml-latest-small] [--models NAME ...] [--out FILE]

NeuMF follows the paper's recipe: a GMF and an MLP model are trained first (each with
its epochs chosen on validation), ``NeuMF.from_pretrained(gmf, mlp, alpha=0.5)`` joins
them, and the joint model trains on with plain SGD.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

import rankfast
from rankfast import datasets
from rankfast.baselines import EASE
from rankfast.data import history_features, leave_last_out
from rankfast.evaluate import evaluate_sampled
from rankfast.models import GMF, DotConfig, DotModel, GMFConfig, MLPConfig, MLPModel, NeuMF
from rankfast.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
NEGATIVES = 99
KS = (10,)
EASE_LAMBDAS = (30.0, 100.0, 300.0, 1000.0)
#: The pretraining stages' settings (the paper's: pointwise log loss, 4 negatives, Adam).
PRETRAIN = dict(loss="bce", num_negatives=4, lr=1e-3, batch_size=256, epochs=20, patience=3)


def sampled(model, train, test):
    return evaluate_sampled(model, train, test, num_negatives=NEGATIVES, ks=KS, seed=0)


def monitored(**options) -> TrainConfig:
    """Training settings monitored on the validation items by the sampled protocol."""
    return TrainConfig(
        valid_protocol="sampled",
        valid_num_negatives=NEGATIVES,
        eval_ks=KS,
        monitor="ndcg@10",
        progress=False,
        **options,
    )


def trained(model, data, config: TrainConfig, valid, epochs):
    """``(model, epochs)``: with ``valid``, trained with early stopping and the best epoch
    chosen; without, trained for ``epochs`` (the schedule spans them)."""
    if valid is None:
        fit(model, data, dataclasses.replace(config, epochs=epochs, patience=None))
        return model, epochs
    history = fit(model, data, config, valid=valid)
    return model, max(history, key=lambda r: r["ndcg@10"])["epoch"]


def history_tower(data, valid, epochs):
    """An item-based user tower (bench_quality's best model): the user is its training
    history through a learned projection, full softmax; scored with the history
    weighted by recency."""
    torch.manual_seed(0)
    config = DotConfig(data.num_users, data.num_items, 256, user_feature_dim=data.num_items)
    model = DotModel(config, user_features=history_features(data))
    options = monitored(loss="softmax", negatives="all", lr=0.03, batch_size=8192, epochs=30, patience=5)
    model, best = trained(model, data, options, valid, epochs and epochs["tower"])
    model.user_repr.set_features(history_features(data, half_life=5, floor=0.1))
    return model, {"tower": best}


def neumf_pretrained(data, valid, epochs):
    """GMF and MLP pretrained, joined with alpha 0.5, then trained on with SGD."""
    epochs = epochs or {}
    torch.manual_seed(0)
    gmf, gmf_epochs = trained(
        GMF(GMFConfig(data.num_users, data.num_items, 32)), data, monitored(**PRETRAIN), valid, epochs.get("gmf")
    )
    torch.manual_seed(0)
    mlp = MLPModel(MLPConfig(data.num_users, data.num_items, 32, hidden=(64, 32, 16)))
    mlp, mlp_epochs = trained(mlp, data, monitored(**PRETRAIN), valid, epochs.get("mlp"))
    model = NeuMF.from_pretrained(gmf, mlp, alpha=0.5)
    joint = monitored(**{**PRETRAIN, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "epochs": 10})
    model, neumf_epochs = trained(model, data, joint, valid, epochs.get("neumf"))
    return model, {"gmf": gmf_epochs, "mlp": mlp_epochs, "neumf": neumf_epochs}


MODELS = {"DotModel (history), recency-weighted": history_tower, "NeuMF (pretrained GMF + MLP)": neumf_pretrained}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-latest-small", help="a MovieLens name or directory")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loo-ml-latest-small.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    train, test = leave_last_out(datasets.load(args.data))
    part, valid = leave_last_out(train)
    rows = []

    def report(name, metrics, seconds, note):
        rows.append((name, metrics["hr@10"], metrics["ndcg@10"], seconds, note))
        print(
            f"{name}: HR@10 {metrics['hr@10']:.4f} NDCG@10 {metrics['ndcg@10']:.4f} {seconds:.0f} s {note}", flush=True
        )

    scores = {lam: sampled(EASE(part, lam=lam), part, valid) for lam in EASE_LAMBDAS}
    lam = max(EASE_LAMBDAS, key=lambda v: scores[v]["ndcg@10"])
    started = time.perf_counter()
    ease = EASE(train, lam=lam)
    seconds = time.perf_counter() - started
    tried = ", ".join(f"{v:g}: {scores[v]['hr@10']:.4f} / {scores[v]['ndcg@10']:.4f}" for v in EASE_LAMBDAS)
    report(f"EASE^R (lambda {lam:g})", sampled(ease, train, test), seconds, f"valid HR@10 / NDCG@10 by lambda: {tried}")

    for name in args.models:
        recipe = MODELS[name]
        started = time.perf_counter()
        selection, epochs = recipe(part, valid, None)
        chosen = sampled(selection, part, valid)
        select_seconds = time.perf_counter() - started
        started = time.perf_counter()
        model, _ = recipe(train, None, epochs)
        seconds = time.perf_counter() - started
        note = (
            f"valid HR@10 / NDCG@10 {chosen['hr@10']:.4f} / {chosen['ndcg@10']:.4f}, epochs {epochs} "
            f"(selection run {select_seconds:.0f} s)"
        )
        report(name, sampled(model, train, test), seconds, note)

    ease_row = rows[0]
    best = max(rows[1:], key=lambda r: r[2], default=None)
    met = best is not None and best[1] > ease_row[1] and best[2] > ease_row[2]
    verdict = f"Target (the best learned model above EASE^R on HR@10 and NDCG@10): {'met' if met else 'MISSED'}" + (
        "" if best is None else f"; {best[0]} {best[1]:.4f} / {best[2]:.4f} vs {ease_row[1]:.4f} / {ease_row[2]:.4f}"
    )
    print(verdict)
    lines = [
        f"# Leave-one-out, {NEGATIVES} sampled negatives: {args.data}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, 1 torch thread, torch {torch.__version__}, "
        f"rankfast {rankfast.__version__}, load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f} "
        "(2 shared cores: timings are noisy). `python bench/bench_loo.py` reruns it.",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| model | HR@10 | NDCG@10 | seconds | notes |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {n} | {h:.4f} | {g:.4f} | {s:.1f} | {note} |" for n, h, g, s, note in rows),
        "",
        verdict + ".",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
