"""Fused Triton kernels vs eager PyTorch written the obvious way vs torch.compile of it (GPU).

Cases (from issue 4), on CUDA:

* ``mlp bf16`` / ``mlp fp32``: MLPModel D=64, hidden 256-128, B=1024 users x
  N=4096 shared candidates (fp32 with TF32 matmuls for all three:
  ``torch.set_float32_matmul_precision("high")``);
* ``din bf16``: AttentionModel D=64, unit 80-40, output MLP 256-128, B=256 x
  N=512, histories of L=100 drawn from the candidates; also rankfast's
  factorized path on the GPU (``rankfast-factorized``, i.e.
  ``RANKFAST_BACKEND=factorized``), which runs the unit once per (candidate,
  distinct history item), about 50 slots per item here, to decide whether the
  GPU dispatch should take it for such histories;
* ``score+topk``: the MLP case with k=100: fused (rankfast) vs rankfast's
  scores then ``torch.topk`` (``rankfast-unfused``) vs eager / compiled
  scoring then ``torch.topk``;
* ``train``: forward + backward of a softmax loss over B=1024 users x N=512
  shared candidates, MLPModel and NeuMF in bf16; DIN (the din case's model)
  over B=256 x N=128, L=100. rankfast runs ``training_scores``, the path
  ``rankfast.fit`` takes on a GPU.

Conventions (bench/report.py): ``benchmark.group`` is the case,
``extra_info["impl"]`` one of "rankfast", "eager", "torch.compile" (plus
"rankfast-unfused" in the top-K case, "rankfast-factorized" in the DIN case), ``extra_info["peak_mem_bytes"]`` from
bench/memory.py. The rankfast rows also record achieved TFLOP/s on the pair
layers and the fraction of the measured bf16 matmul ceiling
(``extra_info["tflops"]``, ``["ceiling_tflops"]``, ``["ceiling_fraction"]``).
Every implementation is checked against the others before timing.

    pytest bench/bench_kernels.py --benchmark-json=/tmp/kernels.json
    python bench/report.py /tmp/kernels.json --title "Fused kernels" --out bench/results/<date>-<gpu>.md

Without a GPU the module is skipped; ``BENCH_SMALL=1`` runs tiny sizes on the
CPU through Triton's interpreter (a check that the file works, not a benchmark).
"""

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
SMALL = os.environ.get("BENCH_SMALL") == "1"
if not HAS_CUDA:
    if not SMALL:
        pytest.skip("GPU benchmarks (BENCH_SMALL=1 runs a tiny CPU smoke version)", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rankfast  # noqa: E402
from rankfast.models import AttentionConfig, AttentionModel, MLPConfig, MLPModel, NeuMF, NeuMFConfig  # noqa: E402
from rankfast.models.attention import history_mask  # noqa: E402
from rankfast.scoring import BACKEND_ENV  # noqa: E402
from rankfast.scoring.backends.fused import model_scores, model_topk, training_scores  # noqa: E402

from memory import peak_memory  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# fp32 cases: TF32 tensor cores for every implementation (eager, torch.compile and the kernels,
# which follow this setting), as the "fp32 (tf32 dots)".
torch.set_float32_matmul_precision("high")
ROUNDS = 1 if SMALL else 10
D = 64


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@dataclass
class Case:
    group: str
    impls: dict[str, Callable[[], object]]
    check: Callable[[], None]
    flops: float = 0.0  # FLOPs of the pair layers per call (for the rankfast row's roofline figures)
    extra: dict = field(default_factory=dict)


def _close(a, b, what, rtol):
    a, b = a.float(), b.float()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol}"


def _sizes(full, small):
    return small if SMALL else full


# --- MLP scoring ---------------------------------------------------------------------------


def eager_mlp(model, users, items):
    """The obvious code: expand users x candidates, concatenate, run the tower."""
    e_u, e_i = model.user_repr(users), model.item_repr(items)
    b, n = e_u.shape[0], e_i.shape[0]
    x = torch.cat([e_u[:, None].expand(b, n, -1), e_i[None].expand(b, n, -1)], dim=-1)
    return model.tower(x.reshape(b * n, -1)).view(b, n)


def mlp_flops(hidden, pairs):
    """Per pair: the split first layer's add + activation is not matmul work; then H1*H2 ... and the output."""
    widths = list(hidden) + [1]
    return pairs * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def mlp_case(dtype):
    b, n = _sizes((1024, 4096), (8, 50))
    hidden = (256, 128)
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(b, n, D, hidden=hidden)).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    compiled = torch.compile(lambda u, i: eager_mlp(model, u, i))
    rtol = 2e-2 if dtype != torch.float32 else 1e-3

    def ours():
        with torch.inference_mode():
            return model_scores(model, users, items)

    def eager():
        with torch.inference_mode():
            return eager_mlp(model, users, items)

    def comp():
        with torch.inference_mode():
            return compiled(users, items)

    def check():
        want = eager()
        _close(ours(), want, "rankfast vs eager", rtol)
        _close(comp(), want, "torch.compile vs eager", rtol)

    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return Case(
        f"mlp {name} B={b} N={n}",
        {"rankfast": ours, "eager": eager, "torch.compile": comp},
        check,
        flops=mlp_flops(hidden, b * n),
    )


# --- DIN scoring ---------------------------------------------------------------------------


def eager_din(model, users, items, history, lengths):
    """The obvious code: every (user, candidate, history item) through the unit, softmax, tower."""
    mask = history_mask(lengths, history.shape[1])
    h = model.item_repr(history.masked_fill(~mask, 0))  # [B, L, D]
    q = model.item_repr(items)  # [N, D]
    b, length, d = h.shape
    n = q.shape[0]
    hh = h[:, None].expand(b, n, length, d)
    qq = q[None, :, None].expand(b, n, length, d)
    logits = model.unit(torch.cat([hh, qq, hh - qq, hh * qq], dim=-1)).squeeze(-1)
    valid = mask[:, None]
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1) * valid
    pooled = (weights.unsqueeze(-1) * hh).sum(2)
    x = torch.cat([model.user_repr(users)[:, None].expand(b, n, d), pooled, q[None].expand(b, n, d)], dim=-1)
    return model.tower(x).squeeze(-1)


def din_case(dtype=torch.bfloat16):
    b, n, length = _sizes((256, 512, 100), (4, 20, 7))
    unit, hidden = (80, 40), (256, 128)
    torch.manual_seed(0)
    config = AttentionConfig(b, n, D, hidden=hidden, attention="din", unit_hidden=unit)
    model = AttentionModel(config).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    history = torch.randint(0, n, (b, length), device=DEVICE)
    lengths = torch.full((b,), length, device=DEVICE)
    compiled = torch.compile(lambda *a: eager_din(model, *a))
    args = (users, items, history, lengths)

    def ours():
        with torch.inference_mode():
            return model_scores(model, *args)

    def eager():
        with torch.inference_mode():
            return eager_din(model, *args)

    def comp():
        with torch.inference_mode():
            return compiled(*args)

    def factorized():
        with mock.patch.dict(os.environ, {BACKEND_ENV: "factorized"}):
            return rankfast.score(model, users, items, history=history, lengths=lengths)

    def check():
        want = eager()
        _close(ours(), want, "rankfast vs eager", 2e-2)
        _close(comp(), want, "torch.compile vs eager", 2e-2)
        _close(factorized(), want, "rankfast-factorized vs eager", 2e-2)

    # Per (pair, history item): the h*q term D -> A1 and the unit's other layers; per pair: pooled @ Wp and the tower.
    unit_w = [D, *unit, 1]
    per_item = (
        sum(2 * x * y for x, y in zip(unit_w[:-1], unit_w[1:], strict=True)) + 2 * 2 * D
    )  # + softmax-weighted sum
    per_pair = 2 * D * hidden[0] + mlp_flops(hidden, 1)
    impls = {"rankfast": ours, "rankfast-factorized": factorized, "eager": eager, "torch.compile": comp}
    return Case(f"din bf16 B={b} N={n} L={length}", impls, check, flops=b * n * (length * per_item + per_pair))


# --- score + top-K ---------------------------------------------------------------------------


def topk_case(dtype=torch.bfloat16, k=100):
    b, n = _sizes((1024, 4096), (8, 150))
    hidden = (256, 128)
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(b, n, D, hidden=hidden)).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    compiled = torch.compile(lambda u, i: torch.topk(eager_mlp(model, u, i), k, dim=1))

    def ours():
        return model_topk(model, users, items, k=k)

    def unfused():
        with torch.inference_mode():
            return torch.topk(model_scores(model, users, items), k, dim=1)

    def eager():
        with torch.inference_mode():
            return torch.topk(eager_mlp(model, users, items), k, dim=1)

    def comp():
        with torch.inference_mode():
            return compiled(users, items)

    def check():
        _, values = ours()
        _close(values, unfused().values, "fused vs unfused top-K values", 1e-6)
        _close(values, eager().values, "fused vs eager top-K values", 2e-2)
        _close(comp().values, eager().values, "torch.compile vs eager top-K values", 2e-2)

    return Case(
        f"score+topk mlp bf16 B={b} N={n} k={k}",
        {"rankfast": ours, "rankfast-unfused": unfused, "eager": eager, "torch.compile": comp},
        check,
        flops=mlp_flops(hidden, b * n),
    )


# --- training step ---------------------------------------------------------------------------


def eager_neumf(model, users, items):
    b, n = users.shape[0], items.shape[0]
    gmf_u, mlp_u = model.user_repr(users).chunk(2, dim=-1)
    gmf_i, mlp_i = model.item_repr(items).chunk(2, dim=-1)
    x = torch.cat([mlp_u[:, None].expand(b, n, -1), mlp_i[None].expand(b, n, -1)], dim=-1)
    mlp = model.branch(x)
    gmf = gmf_u[:, None] * gmf_i[None]
    return model.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


def train_impls(model, eager_fn, args, target):
    """Training steps (forward + backward of a softmax loss over the candidates) through
    rankfast's ``training_scores``, the eager code and ``torch.compile`` of it, and a check."""

    def step(m, fn):
        def run():
            m.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(fn(m, *args).float(), target)
            loss.backward()
            return loss.detach()

        return run

    impls = {
        "rankfast": step(model, training_scores),
        "eager": step(model, eager_fn),
        "torch.compile": step(model, torch.compile(eager_fn)),
    }

    def flat_grads(m):
        return torch.cat([p.grad.double().reshape(-1) for p in m.parameters()])

    def check():
        """All gradients against the float64 eager model: each bf16 implementation within 2e-2 or
        1.5x the eager bf16 code's own error (bf16 gradients are a few % off float64)."""
        model64 = copy.deepcopy(model).double()
        step(model64, eager_fn)()
        want = flat_grads(model64)
        errs = {}
        for name, fn in impls.items():
            fn()
            errs[name] = float((flat_grads(model) - want).norm() / want.norm())
        for name in ("rankfast", "torch.compile"):
            assert errs[name] < max(2e-2, 1.5 * errs["eager"]), f"{name} gradients vs float64: {errs}"

    return impls, check


def train_case(kind, dtype=torch.bfloat16):
    b, n = _sizes((1024, 512), (8, 40))
    torch.manual_seed(0)
    if kind == "mlp":
        model, eager_fn = MLPModel(MLPConfig(b, 4 * n, D, hidden=(256, 128))), eager_mlp
    else:
        model, eager_fn = NeuMF(NeuMFConfig(b, 4 * n, D, hidden=(256, 128))), eager_neumf
    model = model.to(DEVICE, dtype).train()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    target = torch.arange(b, device=DEVICE) % n  # each user's positive among the shared candidates
    impls, check = train_impls(model, eager_fn, (users, items), target)
    return Case(
        f"train {kind} bf16 B={b} N={n}", impls, check, flops=3 * mlp_flops((256, 128), b * n)
    )  # forward + two backward matmuls per layer


def train_din_case(dtype=torch.bfloat16):
    b, n, length = _sizes((256, 128, 100), (4, 20, 7))
    torch.manual_seed(0)
    model = AttentionModel(AttentionConfig(b, 4 * n, D, hidden=(256, 128), unit_hidden=(80, 40)))
    model = model.to(DEVICE, dtype).train()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    history = torch.randint(0, 4 * n, (b, length), device=DEVICE)
    lengths = torch.full((b,), length, device=DEVICE)
    target = torch.arange(b, device=DEVICE) % n
    impls, check = train_impls(model, eager_din, (users, items, history, lengths), target)
    return Case(f"train din bf16 B={b} N={n} L={length}", impls, check)


CASES = {
    "mlp-bf16": lambda: mlp_case(torch.bfloat16),
    "mlp-fp32": lambda: mlp_case(torch.float32),
    "din-bf16": din_case,
    "topk-bf16": topk_case,
    "train-mlp": lambda: train_case("mlp"),
    "train-neumf": lambda: train_case("neumf"),
    "train-din": train_din_case,
}
IMPLS = ["rankfast", "rankfast-unfused", "rankfast-factorized", "eager", "torch.compile"]


def measure_bf16_ceiling():
    """Measured dense bf16 matmul TFLOP/s (median of 10 timed 8192^3 products)."""
    if not HAS_CUDA:
        return float("nan")
    size = 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


@pytest.fixture(scope="module")
def ceiling():
    return measure_bf16_ceiling()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels(benchmark, cases, ceiling, case, impl):
    c = cases(case)
    if impl not in c.impls:
        pytest.skip(f"{impl} is not part of case {case}")
    fn = c.impls[impl]

    def timed():
        out = fn()
        sync()
        return out

    benchmark.group = c.group
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu (interpreter)"
    if HAS_CUDA:
        torch.cuda.empty_cache()
    _, peak = peak_memory(lambda: benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1), DEVICE)
    benchmark.extra_info["peak_mem_bytes"] = peak
    if c.flops:
        tflops = c.flops / benchmark.stats.stats.median / 1e12
        benchmark.extra_info["tflops"] = tflops
        benchmark.extra_info["ceiling_tflops"] = ceiling
        benchmark.extra_info["ceiling_fraction"] = tflops / ceiling if ceiling == ceiling else None
