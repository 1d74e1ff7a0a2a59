"""Seconds per training epoch of an AttentionModel on a CPU, before and after the
factorized training path (a script, not a test).

The case is the one a new user tries first: ``rankfast train --model attention
--users 500 --items 300``, i.e. the command line's attention defaults (dim 32,
the AttentionConfig defaults: DIN unit 80-40, output MLP 256-128; sampled softmax
over 32 popularity negatives, batch 1024, histories of up to 50 items) on the
built-in synthetic data, one torch thread. "before" trains through the model's
own forward over expanded (user, candidate) pairs (``RANKFAST_BACKEND=reference``);
"after" through ``rankfast.scoring.backends.factorized.training_scores`` (the
default). Both start from the same weights and see the same batches. The
"after" path is timed before and after the "before" one and averaged, so that a
change in the machine's load during the long "before" run biases the ratio less.

    python bench/bench_train.py [--users 500 --items 300] [--epochs 1] [--out bench/results/FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

import rankfast
from rankfast.cli.workflow import build_model, defaults, split
from rankfast.train import TrainConfig, fit

from memory import peak_memory

REPO = Path(__file__).resolve().parents[1]
BEFORE, AFTER = "before (model forward, expanded pairs)", "after (factorized training scores)"
#: The order of the timed runs: "after" on either side of "before".
RUNS = ((AFTER, "auto"), (BEFORE, "reference"), (AFTER, "auto"))


def run(settings, backend: str, epochs: int):
    """``(seconds per epoch, last loss)`` of ``epochs`` epochs through ``backend``."""
    os.environ["RANKFAST_BACKEND"] = backend
    train, _ = split(settings["data"], settings["test_ratio"])
    torch.manual_seed(0)
    model = build_model(settings["model"], train)
    config = TrainConfig(**{**settings["train"], "epochs": epochs, "progress": False})
    history = fit(model, train, config)
    return sum(r["seconds"] for r in history) / len(history), history[-1]["loss"], len(train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed per path (default 1)")
    parser.add_argument(
        "--out", default=None, help="results file (default bench/results/<date>-cpu-train-attention.md)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = defaults({"synthetic": {"num_users": args.users, "num_items": args.items, "seed": 0}}, "attention")
    load = os.getloadavg()
    timed = {BEFORE: [], AFTER: []}
    for name, backend in RUNS:
        (seconds, loss, interactions), peak = peak_memory(
            lambda backend=backend: run(settings, backend, args.epochs), "cpu"
        )
        timed[name].append((seconds, loss, peak / 2**20))
        print(f"{name}: {seconds:.1f} s an epoch, loss {loss:.4f}, peak {peak / 2**20:.0f} MiB", flush=True)
    rows = [
        (name, sum(t[0] for t in runs) / len(runs), " / ".join(f"{t[0]:.1f}" for t in runs), runs[-1][1], runs[-1][2])
        for name, runs in timed.items()
    ]
    speedup = rows[0][1] / rows[1][1]
    today = datetime.date.today().isoformat()
    out = Path(args.out or REPO / "bench" / "results" / f"{today}-cpu-train-attention.md")
    lines = [
        "# Training an AttentionModel on a CPU: seconds per epoch",
        "",
        f"{today}, {platform.machine()}, {os.cpu_count()} cores (shared), 1 torch thread, torch {torch.__version__}, "
        f"rankfast {rankfast.__version__}, load average at start {load[0]:.2f} / end {os.getloadavg()[0]:.2f}.",
        "",
        f"`rankfast train --model attention --users {args.users} --items {args.items}`'s settings: "
        f"{settings['model']}, {settings['train']}; {interactions} training interactions; "
        f"{args.epochs} epoch(s) timed per path, same initial weights and batches. "
        "`python bench/bench_train.py` reruns it.",
        "",
        "| path | seconds / epoch | runs | loss after the last epoch | peak MiB |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | {mean:.1f} | {each} | {loss:.4f} | {peak:.0f} |" for name, mean, each, loss, peak in rows),
        "",
        f"Speedup: {speedup:.1f}x. Peak MiB: the process's peak resident memory above its size before the run.",
        "",
    ]
    out.write_text("\n".join(lines))
    print(f"speedup {speedup:.1f}x; wrote {out}")


if __name__ == "__main__":
    main()
