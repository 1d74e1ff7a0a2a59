"""Click-through prediction on MovieLens against deepctr-torch (a script, not a test).

Task: click = rating >= 4 on ml-latest-small, point-wise log-loss on the labelled
rows (``TrainConfig(task="click")``). One fixed split: a uniformly random 20% of the
ratings (seed 0) is the test set. Fields, the same for every model: user id, item id,
the movie's genres (multi-valued, mean-pooled), release year, tags (multi-valued, the
10 most applied, mean-pooled), and the rating's hour and weekday (UTC), all embedded
in 16 dimensions; deep parts 256-128 ReLU; Adam at 1e-3, constant, batch 256, no
weight decay in rankfast, deepctr-torch's defaults otherwise (its L2 of 1e-5 on
embeddings and linear weights, embeddings initialised with std 1e-4); the same
number of epochs for every model.

deepctr-torch gets the same encoded columns (``rankfast.data.load_movielens``'s
vocabularies; its bags use 0 as padding, so bag values are shifted by one). Each
epoch of every model is one call ("train one more epoch": rankfast's ``fit``
resuming from its checkpoint, deepctr-torch's ``fit(epochs=1)``), the models
alternating epoch by epoch so that all see the same load on a shared machine,
with the same ``torch.set_num_threads`` for all (``--threads``, default 1: one core's
efficiency; torch's own default is the machine's cores). An epoch's seconds are deepctr-torch's
whole ``fit`` call and rankfast's epoch as ``fit`` times it (its history's
``seconds``: the epoch's micro-batches, steps and losses); the wall time of
rankfast's call, which also reads and writes the checkpoint and the model
directory that the epoch-by-epoch resumption needs, is listed beside it. The
process's CPU time of each call (``time.process_time``, all its threads: what the
epoch cost, whatever else ran on the machine) is reported too. After each epoch the test AUC and
log-loss are computed the same way for every model (``rankfast.metrics``, from
the model's logits or probabilities).

    python bench/bench_ctr.py [--epochs 5] [--threads 1] [--out bench/results/<date>-ctr-ml-latest-small.md]

Needs ``pip install deepctr-torch`` (a bench-only dependency; rankfast never imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch

import rankfast
from rankfast import datasets, metrics
from rankfast.data import random_split
from rankfast.models import DCNConfig, DCNv2, DeepFM, DeepFMConfig

DIM, HIDDEN, BATCH, LR, SEED = 16, (256, 128), 256, 1e-3, 0


def rankfast_runner(name, model, train, test, workdir):
    """A function that trains ``model`` one more epoch (resuming its checkpoint) and returns
    ``(seconds, test logits)``."""
    state = {"epoch": 0}
    checkpoints = os.path.join(workdir, name)
    context = {k: torch.from_numpy(v) for k, v in test.features.select(model.context_fields).context.values.items()}
    users, items = torch.from_numpy(test.users), torch.from_numpy(test.items)

    def epoch():
        state["epoch"] += 1
        config = rankfast.TrainConfig(
            task="click",
            epochs=state["epoch"],
            batch_size=BATCH,
            lr=LR,
            schedule="constant",
            seed=SEED,
            checkpoint_dir=checkpoints,
            progress=False,
        )
        started, cpu = time.perf_counter(), time.process_time()
        history = rankfast.fit(model, train, config)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        model.eval()
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(
                        users[s : s + 8192],
                        items[s : s + 8192],
                        context={k: v[s : s + 8192] for k, v in context.items()},
                    )
                    for s in range(0, len(users), 8192)
                ]
            )
        return history[-1]["seconds"], wall, cpu, logits.double().numpy()

    return epoch


def deepctr_columns(data, features):
    """deepctr-torch's feature columns and inputs of ``data`` (rankfast's encoding; bags shifted by one)."""
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    columns = [
        SparseFeat("user", data.num_users, embedding_dim=DIM),
        SparseFeat("item", data.num_items, embedding_dim=DIM),
    ]
    inputs = {"user": data.users, "item": data.items}
    for f in features.schema:
        table = getattr(features, f.side).values[f.name]
        rows = table if f.side == "context" else table[data.users if f.side == "user" else data.items]
        if f.kind == "multi":
            columns.append(
                VarLenSparseFeat(SparseFeat(f.name, f.rows + 1, embedding_dim=DIM), maxlen=f.max_len, combiner="mean")
            )
            inputs[f.name] = rows + 1  # 0 pads
        else:
            columns.append(SparseFeat(f.name, f.rows, embedding_dim=DIM))
            inputs[f.name] = rows
    return columns, inputs


def deepctr_runner(kind, train, test):
    from deepctr_torch.models import DCN, DeepFM

    columns, inputs = deepctr_columns(train, train.features)
    _, test_inputs = deepctr_columns(test, test.features)
    torch.manual_seed(SEED)
    with contextlib.redirect_stdout(io.StringIO()):
        if kind == "DeepFM":
            model = DeepFM(columns, columns, task="binary", dnn_hidden_units=HIDDEN, seed=SEED, device="cpu")
        else:
            model = DCN(
                columns,
                columns,
                cross_num=2,
                cross_parameterization="matrix",
                dnn_hidden_units=HIDDEN,
                task="binary",
                seed=SEED,
                device="cpu",
            )
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    labels = train.ratings.astype(np.float32)

    def epoch():
        started, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            model.fit(inputs, labels, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        with contextlib.redirect_stdout(io.StringIO()):
            probs = model.predict(test_inputs, batch_size=8192).reshape(-1).astype(np.float64)
        probs = np.clip(probs, 1e-12, 1 - 1e-12)
        return seconds, seconds, cpu, np.log(probs) - np.log1p(-probs)  # logits, so both are scored alike

    return epoch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml-latest-small")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every model (default 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import deepctr_torch

    data = datasets.load(args.data).clicks(4.0)
    train, test = random_split(data, 0.2, seed=SEED)
    schema = train.features.schema
    print(f"{len(train)} training / {len(test)} test ratings, {test.ratings.mean():.3f} clicked; fields {schema.names}")

    def build(cls, config_cls, **kw):
        torch.manual_seed(SEED)
        config = config_cls(train.num_users, train.num_items, DIM, fields=schema, hidden=HIDDEN, **kw)
        return cls(config, features=train.features)

    with tempfile.TemporaryDirectory() as workdir:
        runners = {
            "rankfast DeepFM": rankfast_runner("deepfm", build(DeepFM, DeepFMConfig), train, test, workdir),
            "deepctr-torch DeepFM": deepctr_runner("DeepFM", train, test),
            "rankfast DCN-v2": rankfast_runner("dcn", build(DCNv2, DCNConfig, cross_layers=2), train, test, workdir),
            "deepctr-torch DCN-M": deepctr_runner("DCN", train, test),
        }
        results = {name: [] for name in runners}
        for epoch in range(1, args.epochs + 1):
            for name, run in runners.items():
                seconds, wall, cpu, logits = run()
                row = {
                    "epoch": epoch,
                    "seconds": seconds,
                    "wall": wall,
                    "cpu": cpu,
                    "auc": metrics.auc(logits, test.ratings),
                    "logloss": metrics.log_loss(logits, test.ratings),
                }
                results[name].append(row)
                print(
                    f"{name:22s} epoch {epoch}: {seconds:5.2f} s ({wall:5.2f} s the call, {cpu:5.2f} s CPU)  "
                    f"AUC {row['auc']:.4f}  log-loss {row['logloss']:.4f}",
                    flush=True,
                )

    table = report(results, args, deepctr_torch.__version__, len(train), len(test), schema)
    print(table)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"{datetime.date.today()}-ctr-{os.path.basename(str(args.data))}.md"
    )
    with open(out, "w", encoding="utf-8") as f:
        f.write(table)
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results, args, deepctr_version, n_train, n_test, schema) -> str:
    base = results["deepctr-torch DeepFM"]
    base_seconds = np.mean([r["seconds"] for r in base])
    lines = [
        f"# CTR on {args.data}: rankfast vs deepctr-torch",
        "",
        f"- date: {datetime.date.today()}; CPU: {_cpu_name()}, {os.cpu_count()} logical cores shared with other "
        f"jobs (load average {os.getloadavg()[0]:.1f} at the end); {platform.platform()}",
        f"- rankfast commit: {_commit()}",
        f"- versions: rankfast {rankfast.__version__}, deepctr-torch {deepctr_version}, torch {torch.__version__}, "
        f"numpy {np.__version__}, python {platform.python_version()}; torch threads {args.threads}",
        f"- task: click = rating >= 4, point-wise log-loss; random 80/20 split (seed {SEED}): {n_train} training, "
        f"{n_test} test ratings",
        f"- fields: user, item, {', '.join(schema.names)}; dim {DIM}, deep {HIDDEN}, batch {BATCH}, Adam {LR}, "
        f"{args.epochs} epochs; models alternate epoch by epoch; seconds: deepctr-torch's `fit(epochs=1)` call, "
        "rankfast's epoch as `fit` times it (the whole resuming call in parentheses below)",
        f"- command: `python bench/bench_ctr.py --threads {args.threads}`",
        "",
        "| model | test AUC | test log-loss | best AUC (epoch) | s / epoch | vs deepctr-torch DeepFM | "
        "vs deepctr-torch's same model | CPU s / epoch | CPU time vs deepctr-torch DeepFM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    twin = {"rankfast DeepFM": "deepctr-torch DeepFM", "rankfast DCN-v2": "deepctr-torch DCN-M"}
    mean = {name: np.mean([r["seconds"] for r in rows]) for name, rows in results.items()}
    cpu = {name: np.mean([r["cpu"] for r in rows]) for name, rows in results.items()}
    for name, rows in results.items():
        last = rows[-1]
        best = max(rows, key=lambda r: r["auc"])
        same = f"{mean[twin[name]] / mean[name]:.2f}x" if name in twin else "-"
        lines.append(
            f"| {name} | {last['auc']:.4f} | {last['logloss']:.4f} | {best['auc']:.4f} ({best['epoch']}) | "
            f"{mean[name]:.2f} | {base_seconds / mean[name]:.2f}x | {same} | {cpu[name]:.2f} | "
            f"{cpu['deepctr-torch DeepFM'] / cpu[name]:.2f}x |"
        )
    lines += [
        "",
        "Per epoch: test AUC / log-loss / seconds (rankfast: the epoch, then its whole resuming call) / CPU seconds:",
        "",
    ]
    names = list(results)
    lines.append("| epoch | " + " | ".join(names) + " |")
    lines.append("| --- |" + " --- |" * len(names))
    for e in range(len(base)):
        cells = []
        for n in names:
            r = results[n][e]
            call = f" ({r['wall']:.2f})" if r["wall"] != r["seconds"] else ""
            cells.append(f"{r['auc']:.4f} / {r['logloss']:.4f} / {r['seconds']:.2f}{call} / {r['cpu']:.2f}")
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
