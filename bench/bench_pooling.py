"""Bag pooling on a CPU: the multi-hot matmul against embedding_bag (a script, not a test).

``rankfast.models.fields.pool_bags`` pools a bag field over a small table (at most
``MULTI_HOT_MAX_ROWS`` rows) as ``multi_hot(bags) @ table`` on a CPU and through
``F.embedding_bag`` otherwise. This measures both paths, forward and backward, at the CTR
benchmark's sizes (batch 256, dim 16, bags of up to 10: MovieLens' genres, 21 rows, and tags,
1,474), then one DCN-v2 training step on ml-latest-small's CTR task (bench_ctr's fields and
sizes) with the multi-hot path on and off. Runs alternate between the two settings (paired),
one torch thread; the table gives medians.

    python bench/bench_pooling.py [--repeats 20] [--out bench/results/<date>-bag-pooling-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from rankfast import datasets
from rankfast.data import random_split
from rankfast.data.fields import PAD
from rankfast.models import DCNConfig, DCNv2
from rankfast.models import fields as fields_module
from rankfast.train.optim import build_optimizer

BATCH, DIM, MAX_LEN = 256, 16, 10


def paired(run, repeats: int, cap: int) -> dict[bool, float]:
    """Median microseconds of ``run()`` with the multi-hot path on (``MULTI_HOT_MAX_ROWS = cap``)
    and off (0), alternating."""
    default = fields_module.MULTI_HOT_MAX_ROWS
    times = {True: [], False: []}
    for r in range(repeats):
        for on in (True, False) if r % 2 else (False, True):
            fields_module.MULTI_HOT_MAX_ROWS = cap if on else 0
            times[on].append(run())
    fields_module.MULTI_HOT_MAX_ROWS = default
    return {on: statistics.median(t) for on, t in times.items()}


def pooling_case(rows: int):
    """A function timing ``pool_bags`` forward and backward over a ``rows``-row table (microseconds)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows + 1, DIM, generator=gen, requires_grad=True)
    bags = torch.randint(0, rows, (BATCH, MAX_LEN), generator=gen)
    bags[torch.arange(MAX_LEN) >= torch.randint(0, MAX_LEN + 1, (BATCH, 1), generator=gen)] = PAD
    upstream = torch.randn(BATCH, DIM, generator=gen)

    def run(number=300):
        started = time.perf_counter()
        for _ in range(number):
            fields_module.pool_bags(bags, weight, "mean").backward(upstream)
        return (time.perf_counter() - started) / number * 1e6

    return run


def dcn_step_case():
    """A function timing 40 DCN-v2 training steps on ml-latest-small's CTR task (microseconds a step)."""
    train, _ = random_split(datasets.load("ml-latest-small").clicks(4.0), 0.2, seed=0)
    torch.manual_seed(0)
    config = DCNConfig(train.num_users, train.num_items, DIM, fields=train.features.schema, hidden=(256, 128))
    model = DCNv2(config, features=train.features)
    optimizer = build_optimizer(model, lr=1e-3)
    users, items = torch.from_numpy(train.users), torch.from_numpy(train.items)
    labels = torch.from_numpy(train.ratings).float()
    context = {k: torch.from_numpy(v) for k, v in train.features.select(model.context_fields).context.values.items()}
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(0))
    state = {"at": 0}

    def run(steps=40):
        started = time.perf_counter()
        for _ in range(steps):
            start = state["at"] % (len(order) - BATCH)
            idx, state["at"] = order[start : start + BATCH], state["at"] + BATCH
            out = model(users[idx], items[idx], context={k: v[idx] for k, v in context.items()})
            F.binary_cross_entropy_with_logits(out, labels[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / steps * 1e6

    run()  # warm-up
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    default = fields_module.MULTI_HOT_MAX_ROWS
    cases = [  # (name, run, the cap that turns the multi-hot path on)
        ("pool_bags forward + backward, 21-row table (genres)", pooling_case(20), default),
        ("pool_bags forward + backward, 1,474-row table (tags), multi-hot forced", pooling_case(1473), 1 << 30),
        ("DCN-v2 training step, ml-latest-small CTR (genres multi-hot when on)", dcn_step_case(), default),
    ]
    lines = [
        "# Bag pooling on a CPU: multi-hot matmul against embedding_bag",
        "",
        f"- date: {datetime.date.today()}; {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"cores shared with other jobs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, 1 thread",
        f"- command: `python bench/bench_pooling.py --repeats {args.repeats}`; medians of paired, alternating runs",
        f"- the 1,474-row table is past `MULTI_HOT_MAX_ROWS` ({default}), so rankfast pools it with embedding_bag; "
        "its 'on' column forces the multi-hot path to show why the cap exists",
        "",
        "| case | multi-hot on (us) | embedding_bag (us) | on / off |",
        "| --- | --- | --- | --- |",
    ]
    for name, run, cap in cases:
        medians = paired(run, args.repeats, cap)
        lines.append(f"| {name} | {medians[True]:.0f} | {medians[False]:.0f} | {medians[True] / medians[False]:.2f} |")
        print(lines[-1], flush=True)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{datetime.date.today()}-bag-pooling-cpu.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
