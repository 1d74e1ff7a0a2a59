"""rankfast.topk vs torch.topk vs numpy argpartition+sort on the CPU.

B=1024 rows, N in {10k, 100k}, k in {10, 100}, uniform and ascending rows,
each implementation with its default threads. Run:

    pytest bench/bench_topk.py --benchmark-json=/tmp/topk.json
    python bench/report.py /tmp/topk.json --title "CPU top-K" --out bench/results/<date>-cpu-topk.md
"""

import numpy as np
import pytest
import torch

import rankfast

ROWS = 1024
CASES = [(n, k, kind) for kind in ("uniform", "ascending") for n in (10_000, 100_000) for k in (10, 100)]


def make_scores(n, kind):
    if kind == "uniform":
        return torch.rand(ROWS, n, generator=torch.Generator().manual_seed(0))
    return torch.arange(n, dtype=torch.float32).expand(ROWS, n).contiguous()


def numpy_topk(x, k):
    part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(x, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)


IMPLS = {
    "rankfast": lambda t, a, k: rankfast.topk(a, k),
    "torch.topk": lambda t, a, k: torch.topk(t, k, dim=1),
    "numpy": lambda t, a, k: numpy_topk(a, k),
}


@pytest.fixture(scope="module")
def scores_cache():
    return {}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,k,kind", CASES, ids=[f"{kind}-N{n}-k{k}" for n, k, kind in CASES])
def test_topk(benchmark, scores_cache, impl, n, k, kind):
    if (n, kind) not in scores_cache:
        scores_cache.clear()  # keep one 400 MB matrix alive at a time
        t = make_scores(n, kind)
        scores_cache[(n, kind)] = (t, t.numpy())
    t, a = scores_cache[(n, kind)]
    benchmark.group = f"topk B={ROWS} N={n} k={k} {kind}"
    benchmark.extra_info["impl"] = impl
    fn = IMPLS[impl]
    benchmark.pedantic(fn, args=(t, a, k), rounds=5, iterations=1, warmup_rounds=1)
