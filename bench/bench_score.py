"""rankfast.score vs eager PyTorch written the obvious way vs torch.compile of it.

Cases (fp32, on CUDA when available, else the CPU):

* MLP model, D=64, hidden 256-128, B=512 users x N=20,000 candidates;
* DIN attention model, D=64, unit 80-40, output MLP 200-80, B=64 x N=2,000,
  histories of L=100 items drawn from the 2,000 candidates (the 6,400 history
  slots hold about 1,900 distinct items, so rankfast runs the attention unit
  once per candidate and distinct history item); and the same with every
  history slot a different item outside the candidates, where no unit result
  can be shared.

The eager baseline expands users and candidates, concatenates them and runs
the model's own layers over every pair, in chunks of users only as large as
needed to stay under EAGER_BYTES of intermediates; "torch.compile" compiles
that same chunk function. Each result is checked against rankfast's before
timing. Peak memory comes from bench/memory.py (one timed run measured).

    pytest bench/bench_score.py --benchmark-json=/tmp/score.json
    python bench/report.py /tmp/score.json --title "Scoring" --out bench/results/<date>-score.md

BENCH_SMALL=1 shrinks every case (a quick check that the file runs).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import rankfast
from rankfast.models import AttentionConfig, AttentionModel, MLPConfig, MLPModel
from rankfast.models.attention import history_mask

from memory import peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = os.environ.get("BENCH_SMALL") == "1"
EAGER_BYTES = 2 * 2**30  # what one chunk of the eager baseline may hold
ROUNDS = {"rankfast": 3, "eager": 1, "torch.compile": 1}  # the baselines take tens of seconds on a CPU
FLOAT = 4


@dataclass
class Case:
    group: str
    impls: dict[str, Callable[[], torch.Tensor]]
    check: Callable[[], None]


def _chunk_users(num_users, bytes_per_user):
    """The largest power of two dividing ``num_users`` whose chunk fits EAGER_BYTES (at least 1)."""
    chunk = 1
    while num_users % (2 * chunk) == 0 and 2 * chunk * bytes_per_user <= EAGER_BYTES:
        chunk *= 2
    return chunk


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{what} disagrees with rankfast: {m}")


# --- MLP -------------------------------------------------------------------------------


def eager_mlp_step(model, e_u, e_i):
    """Scores of users ``e_u [C, D]`` x candidates ``e_i [N, D]``: expand, concatenate, MLP."""
    c, n = e_u.shape[0], e_i.shape[0]
    x = torch.cat([e_u[:, None].expand(c, n, -1), e_i[None].expand(c, n, -1)], dim=-1)
    return model.tower(x.reshape(c * n, -1)).view(c, n)


def mlp_case():
    b, n = (32, 2000) if SMALL else (512, 20_000)
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(b, n, 64, hidden=(256, 128))).to(DEVICE).eval()
    users = torch.arange(b, device=DEVICE)
    chunk = _chunk_users(b, n * FLOAT * (2 * 64 + 2 * 256 + 2 * 128 + 1))
    compiled_step = torch.compile(lambda e_u, e_i: eager_mlp_step(model, e_u, e_i))

    def baseline(step):
        with torch.inference_mode():
            e_u, e_i = model.user_repr.all(), model.item_repr.all()
            return torch.cat([step(e_u[s : s + chunk], e_i) for s in range(0, b, chunk)])

    def ours():
        return rankfast.score(model, users)

    def check():
        first = ours()[:chunk]
        with torch.inference_mode():
            e_u, e_i = model.user_repr.all()[:chunk], model.item_repr.all()
            _close(eager_mlp_step(model, e_u, e_i), first, "eager")
            _close(compiled_step(e_u, e_i), first, "torch.compile")  # also compiles it

    return Case(
        group=f"score mlp B={b} N={n}",
        impls={
            "rankfast": ours,
            "eager": lambda: baseline(lambda e_u, e_i: eager_mlp_step(model, e_u, e_i)),
            "torch.compile": lambda: baseline(compiled_step),
        },
        check=check,
    )


# --- DIN attention ---------------------------------------------------------------------


def eager_din_step(model, e_u, h, mask, q):
    """Users ``e_u [C, D]`` with histories ``h [C, L, D]`` (``mask [C, L]``) x candidates ``q [N, D]``."""
    c, length, d = h.shape
    n = q.shape[0]
    hh = h[:, None].expand(c, n, length, d)
    qq = q[None, :, None].expand(c, n, length, d)
    logits = model.unit(torch.cat([hh, qq, hh - qq, hh * qq], dim=-1)).squeeze(-1)  # [C, N, L]
    valid = mask[:, None]
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1) * valid
    pooled = (weights.unsqueeze(-1) * hh).sum(2)  # [C, N, D]
    x = torch.cat([e_u[:, None].expand(c, n, d), pooled, q[None].expand(c, n, d)], dim=-1)
    return model.tower(x).squeeze(-1)


def din_case(distinct_history: bool = False):
    """``distinct_history``: every history slot holds its own item, from
    ``B * L`` items after the ``N`` candidates; else slots draw from the candidates."""
    b, n, length = (8, 200, 30) if SMALL else (64, 2000, 100)
    torch.manual_seed(0)
    num_items = n + b * length if distinct_history else n
    config = AttentionConfig(b, num_items, 64, hidden=(200, 80), attention="din", unit_hidden=(80, 40))
    model = AttentionModel(config).to(DEVICE).eval()
    users = torch.arange(b, device=DEVICE)
    candidates = torch.arange(n, device=DEVICE)
    if distinct_history:
        history = n + torch.randperm(b * length, device=DEVICE).view(b, length)
    else:
        history = torch.randint(0, n, (b, length), device=DEVICE)
    lengths = torch.full((b,), length, device=DEVICE)
    per_triple = 4 * 64 + 2 * 64 + 2 * 80 + 2 * 40 + 4
    chunk = _chunk_users(b, n * length * FLOAT * per_triple)
    compiled_step = torch.compile(lambda *args: eager_din_step(model, *args))

    def inputs():
        mask = history_mask(lengths, length)
        h = model.item_repr(history.masked_fill(~mask, 0))
        return model.user_repr(users), h, mask, model.item_repr(candidates)

    def baseline(step):
        with torch.inference_mode():
            e_u, h, mask, q = inputs()
            parts = [step(e_u[s : s + chunk], h[s : s + chunk], mask[s : s + chunk], q) for s in range(0, b, chunk)]
            return torch.cat(parts)

    def ours():
        return rankfast.score(model, users, candidates, history=history, lengths=lengths)

    def check():
        first = ours()[:chunk]
        with torch.inference_mode():
            e_u, h, mask, q = inputs()
            args = (e_u[:chunk], h[:chunk], mask[:chunk], q)
            _close(eager_din_step(model, *args), first, "eager")
            _close(compiled_step(*args), first, "torch.compile")

    return Case(
        group=f"score din B={b} N={n} L={length}" + (", no repeated history items" if distinct_history else ""),
        impls={
            "rankfast": ours,
            "eager": lambda: baseline(lambda *args: eager_din_step(model, *args)),
            "torch.compile": lambda: baseline(compiled_step),
        },
        check=check,
    )


CASES = {"mlp": mlp_case, "din": din_case, "din-distinct-history": lambda: din_case(distinct_history=True)}


@pytest.mark.parametrize("impl", list(ROUNDS))
@pytest.mark.parametrize("case", list(CASES))
def test_score(benchmark, cases, case, impl):
    c = cases(case)
    benchmark.group = c.group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = str(DEVICE)
    _, peak = peak_memory(lambda: benchmark.pedantic(c.impls[impl], rounds=ROUNDS[impl], iterations=1), DEVICE)
    benchmark.extra_info["peak_mem_bytes"] = peak
