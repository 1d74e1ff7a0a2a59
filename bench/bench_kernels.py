"""Fused Triton kernels against the best PyTorch a user would write (GPU).

Every case runs, in one process and on the same inputs:

* ``rankfast``: the public call (``model_scores``, ``model_topk`` or
  ``training_scores``), end to end: id checks, split terms, the kernel;
* ``rankfast-op``: the op alone on precomputed arguments (scoring cases);
* ``eager``: the obvious code (expand users x candidates, concatenate, run
  the model's layers);
* ``eager-split``: the split formulation in plain PyTorch (what
  ``RANKFAST_BACKEND=factorized`` does): the first layer as a per-user and a
  per-item term added per pair, DIN's unit first layer as history, candidate
  and ``h*q`` terms;
* ``torch.compile`` / ``torch.compile-split``: both compiled in the default
  mode, and ``torch.compile-max`` / ``torch.compile-split-max`` in
  ``mode="max-autotune-no-cudagraphs"``, each compile under
  ``BENCH_COMPILE_TIMEOUT`` seconds (a compile that overruns is reported as
  such, not timed);
* ``cublas-pair-layer`` (MLP scoring): the shape ceiling, cuBLAS on the pair
  layer ``[B*N, H1] @ [H1, H2]`` with its input materialised beforehand;
* ``rankfast-factorized`` (DIN): ``rankfast.score`` with the factorized
  backend, whose attention unit runs once per (candidate, distinct history item);
* ``rankfast-unfused`` (top-K): the fused scores, then ``torch.topk``.

"Best PyTorch" is the fastest of the eager and torch.compile rows.

Cases (bf16 unless noted): MLP 256-128, D=64, B=1024 x N=4096 (also fp32 with
TF32 matmuls everywhere); DIN unit 80-40, output MLP 256-128, L=100,
B=256 x N=512, with histories drawn from the candidates (each item about 50
times in a block: the unit-table's best case) and with histories that never
repeat an item; MLP score + top-100; training steps (forward and backward of
a softmax over the candidates) for MLP and NeuMF (B=1024 x N=512) and DIN
(B=256 x N=128, L=100).

Recorded per row (``extra_info``): ``impl``; ``gpu_ms``, the device time of
one call (CUDA events around back-to-back calls, no synchronisation between
them; beside pytest-benchmark's end-to-end median, which synchronises every
call); ``peak_mem_bytes``; ``tflops`` and ``ceiling_fraction`` (matmul work
of the pair layers over the measured bf16 matmul ceiling). Every
implementation is checked against the others before timing; training
gradients against the float64 eager model.

    pytest bench/bench_kernels.py --benchmark-json=/tmp/kernels.json
    python bench/probe_report.py /tmp/kernels.json --out bench/results/<date>-<gpu>.md

Without a GPU the module is skipped; ``BENCH_SMALL=1`` runs tiny sizes on the
CPU through Triton's interpreter, with torch.compile's ``eager`` backend (a
check that the file works, not a benchmark). ``BENCH_IMPLS`` (names, space
separated) keeps only those implementations (and the references the checks
compare with).
"""

import contextlib
import copy
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

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
from rankfast.scoring.backends.fused import model_scores, model_topk, op_call, training_scores  # noqa: E402

from memory import peak_memory  # noqa: E402
from probe_report import PYTORCH  # noqa: E402  (the PyTorch rows; "best PyTorch" is the fastest of them)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# fp32 cases: TF32 tensor cores for every implementation (eager, torch.compile and the kernels,
# which follow this setting), as the "fp32 (tf32 dots)".
torch.set_float32_matmul_precision("high")
ROUNDS = 1 if SMALL else 10
WARMUP = 0 if SMALL else 1  # the check has already called every implementation once
GPU_REPS = 1 if SMALL else 20
COMPILE_TIMEOUT = float(os.environ.get("BENCH_COMPILE_TIMEOUT", "240"))
# The models: D=64, MLP 256-128, DIN unit 80-40 (toy widths under BENCH_SMALL).
D = 16 if SMALL else 64
HIDDEN = (32, 16) if SMALL else (256, 128)
UNIT = (20, 10) if SMALL else (80, 40)


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@dataclass
class Case:
    group: str
    impls: dict[str, Callable[[], object]]
    check: Callable[[], None]
    flops: dict = field(default_factory=dict)  # matmul FLOPs of one call, per impl ("*": every impl)
    skipped: dict = field(default_factory=dict)  # impl -> why it is not timed (a compile that overran)


def _close(a, b, what, rtol):
    a, b = a.float(), b.float()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol}"


def _sizes(full, small):
    return small if SMALL else full


# --- torch.compile, under a time limit ----------------------------------------------------------


def compiled(fn, mode=None):
    """``torch.compile(fn, mode=mode)``; on the CPU smoke run, the ``eager`` backend (no inductor)."""
    if not HAS_CUDA:
        return torch.compile(fn, backend="eager")
    return torch.compile(fn, mode=mode)


def compile_variants(naive, split):
    """The four torch.compile rows of a case: both formulations, default and max-autotune modes."""
    return {
        "torch.compile": compiled(naive),
        "torch.compile-split": compiled(split),
        "torch.compile-max": compiled(naive, "max-autotune-no-cudagraphs"),
        "torch.compile-split-max": compiled(split, "max-autotune-no-cudagraphs"),
    }


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises :class:`CompileTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def expire(signum, frame):
        raise CompileTimeout

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_call(case: Case, name: str):
    """Calls implementation ``name`` once, a torch.compile one (which compiles now) within
    ``COMPILE_TIMEOUT``: ``(True, output)``, or ``(False, None)`` when its compile overran
    (it is then dropped from the case, with the reason)."""
    fn = case.impls[name]
    if not name.startswith("torch.compile"):
        return True, fn()
    try:
        with deadline(COMPILE_TIMEOUT):
            return True, fn()
    except CompileTimeout:
        del case.impls[name]
        case.skipped[name] = f"compile took over {COMPILE_TIMEOUT:.0f} s"
        torch._dynamo.reset()
        return False, None


def first_calls(case: Case) -> dict:
    """Every implementation's output from one call (see :func:`first_call`)."""
    outs = {}
    for name in list(case.impls):
        ok, out = first_call(case, name)
        if ok:
            outs[name] = out
    return outs


# --- MLP scoring ---------------------------------------------------------------------------


def eager_mlp(model, users, items):
    """The obvious code: expand users x candidates, concatenate, run the tower."""
    e_u, e_i = model.user_repr(users), model.item_repr(items)
    b, n = e_u.shape[0], e_i.shape[0]
    x = torch.cat([e_u[:, None].expand(b, n, -1), e_i[None].expand(b, n, -1)], dim=-1)
    return model.tower(x.reshape(b * n, -1)).view(b, n)


def split_mlp(model, users, items):
    """The split formulation: ``act(A_u + C_i)`` with ``A = E_u W1u^T + b1``, ``C = E_i W1i^T``."""
    first = model.tower.linears[0]
    w_u, w_i = first.weight.chunk(2, dim=1)
    a = F.linear(model.user_repr(users), w_u, first.bias)
    c = F.linear(model.item_repr(items), w_i)
    return model.tower.from_first(a[:, None] + c[None]).squeeze(-1)


def mlp_flops(hidden, pairs):
    """Per pair: the split first layer's add + activation is not matmul work; then H1*H2 ... and the output."""
    widths = list(hidden) + [1]
    return pairs * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def pair_layer_input(model, users, items):
    """``act(A_u + C_i)`` for every pair, ``[B*N, H1]``: the input of the cuBLAS shape ceiling."""
    first = model.tower.linears[0]
    w_u, w_i = first.weight.chunk(2, dim=1)
    a = F.linear(model.user_repr(users), w_u, first.bias)
    c = F.linear(model.item_repr(items), w_i)
    return model.tower.act(a[:, None] + c[None]).reshape(-1, a.shape[1])


def mlp_case(dtype):
    b, n = _sizes((1024, 4096), (8, 50))
    hidden = HIDDEN
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(b, n, D, hidden=hidden)).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    rtol = 2e-2 if dtype != torch.float32 else 1e-3
    with torch.inference_mode():
        call = op_call(model, users, items)
        x = pair_layer_input(model, users, items)
        w2 = model.tower.linears[1].weight.t().contiguous()
    impls = scoring_impls(
        {
            "rankfast": lambda: model_scores(model, users, items),
            "rankfast-op": lambda: call.op(**call.kwargs),
            "eager": lambda: eager_mlp(model, users, items),
            "eager-split": lambda: split_mlp(model, users, items),
            **{k: _bind(f, model, users, items) for k, f in compile_variants(eager_mlp, split_mlp).items()},
            "cublas-pair-layer": lambda: torch.mm(x, w2),
        }
    )

    def check():
        outs = first_calls(case)
        want = outs["eager"]
        for name, got in outs.items():
            if name != "cublas-pair-layer":
                _close(got.view(want.shape), want, f"{name} vs eager", rtol)

    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    flops = {"*": mlp_flops(hidden, b * n), "cublas-pair-layer": 2 * hidden[0] * hidden[1] * b * n}
    case = Case(f"mlp {name} B={b} N={n}", impls, check, flops=flops)
    return case


def _bind(fn, *args):
    return lambda: fn(*args)


def scoring_impls(impls):
    """Scoring implementations run without autograd."""

    def no_grad(fn):
        def run():
            with torch.inference_mode():
                return fn()

        return run

    return {name: no_grad(fn) for name, fn in impls.items()}


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


def split_din(model, users, items, history, lengths):
    """The split formulation: the unit's first layer over ``[h, q, h-q, h*q]`` as
    ``(Wh + Wd) h + (Wq - Wd) q + Wx (h*q)``, so only the ``h*q`` term is per (pair, item);
    the tower's first layer as per-user, pooled and per-candidate terms."""
    mask = history_mask(lengths, history.shape[1])
    h = model.item_repr(history.masked_fill(~mask, 0))  # [B, L, D]
    q = model.item_repr(items)  # [N, D]
    first = model.unit.linears[0]
    w_h, w_q, w_d, w_x = first.weight.chunk(4, dim=1)
    ht = F.linear(h, w_h + w_d, first.bias)  # [B, L, A1]
    qt = F.linear(q, w_q - w_d)  # [N, A1]
    z = F.linear(h[:, None] * q[None, :, None], w_x) + ht[:, None] + qt[None, :, None]  # [B, N, L, A1]
    logits = model.unit.from_first(z).squeeze(-1)  # [B, N, L]
    valid = mask[:, None]
    weights = torch.softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=-1) * valid
    pooled = torch.einsum("bnl,bld->bnd", weights, h)
    tower = model.tower.linears[0]
    w_u, w_p, w_c = tower.weight.chunk(3, dim=1)
    z = F.linear(model.user_repr(users), w_u, tower.bias)[:, None] + F.linear(pooled, w_p) + F.linear(q, w_c)[None]
    return model.tower.from_first(z).squeeze(-1)


def din_flops(b, n, length, unit, hidden):
    """Per (pair, history item): the h*q term D -> A1 and the unit's other layers, plus the
    softmax-weighted sum; per pair: pooled @ Wp and the tower after its first layer."""
    unit_w = [D, *unit, 1]
    per_item = sum(2 * x * y for x, y in zip(unit_w[:-1], unit_w[1:], strict=True)) + 2 * D
    per_pair = 2 * D * hidden[0] + mlp_flops(hidden, 1)
    return b * n * (length * per_item + per_pair)


def din_case(repeats=True, dtype=torch.bfloat16):
    """``repeats``: histories drawn from the candidates (each item about 50 times in the
    block); else every history slot holds a distinct item outside the candidates."""
    b, n, length = _sizes((256, 512, 100), (4, 20, 7))
    unit, hidden = UNIT, HIDDEN
    num_items = n if repeats else n + b * length
    torch.manual_seed(0)
    config = AttentionConfig(b, num_items, D, hidden=hidden, attention="din", unit_hidden=unit)
    model = AttentionModel(config).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    if repeats:
        history = torch.randint(0, n, (b, length), device=DEVICE)
    else:
        history = n + torch.randperm(b * length, device=DEVICE).view(b, length)
    lengths = torch.full((b,), length, device=DEVICE)
    args = (users, items, history, lengths)
    with torch.inference_mode():
        call = op_call(model, *args)

    def factorized():
        with mock.patch.dict(os.environ, {BACKEND_ENV: "factorized"}):
            return rankfast.score(model, users, items, history=history, lengths=lengths)

    impls = scoring_impls(
        {
            "rankfast": lambda: model_scores(model, *args),
            "rankfast-op": lambda: call.op(**call.kwargs),
            "rankfast-factorized": factorized,
            "eager": lambda: eager_din(model, *args),
            "eager-split": lambda: split_din(model, *args),
            **{k: _bind(f, model, *args) for k, f in compile_variants(eager_din, split_din).items()},
        }
    )

    def check():
        outs = first_calls(case)
        want = outs["eager"]
        for name, got in outs.items():
            _close(got, want, f"{name} vs eager", 2e-2)

    kind = "repeated items" if repeats else "no repeated item"
    group = f"din bf16 B={b} N={n} L={length}, {kind}"
    case = Case(group, impls, check, flops={"*": din_flops(b, n, length, unit, hidden)})
    return case


# --- score + top-K ---------------------------------------------------------------------------


def topk_case(dtype=torch.bfloat16, k=100):
    b, n = _sizes((1024, 4096), (4, 60))
    k = _sizes(k, 10)
    hidden = HIDDEN
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(b, n, D, hidden=hidden)).to(DEVICE, dtype).eval()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)

    def top(fn):
        return lambda m, u, i: torch.topk(fn(m, u, i), k, dim=1)

    impls = scoring_impls(
        {
            "rankfast": lambda: model_topk(model, users, items, k=k),
            "rankfast-unfused": lambda: torch.topk(model_scores(model, users, items), k, dim=1),
            "eager": lambda: top(eager_mlp)(model, users, items),
            "eager-split": lambda: top(split_mlp)(model, users, items),
            **{
                name: _bind(fn, model, users, items)
                for name, fn in compile_variants(top(eager_mlp), top(split_mlp)).items()
            },
        }
    )

    def check():
        outs = first_calls(case)
        if "rankfast" in outs:  # BENCH_IMPLS may leave the fused top-K out; the references always run
            _close(outs["rankfast"][1], outs["rankfast-unfused"].values, "fused vs unfused top-K values", 1e-6)
        for name, got in outs.items():
            if name != "rankfast":
                _close(got.values, outs["eager"].values, f"{name} vs eager top-K values", 2e-2)

    case = Case(f"score+topk mlp bf16 B={b} N={n} k={k}", impls, check, flops={"*": mlp_flops(hidden, b * n)})
    return case


# --- training step ---------------------------------------------------------------------------


def eager_neumf(model, users, items):
    b, n = users.shape[0], items.shape[0]
    gmf_u, mlp_u = model.user_repr(users).chunk(2, dim=-1)
    gmf_i, mlp_i = model.item_repr(items).chunk(2, dim=-1)
    x = torch.cat([mlp_u[:, None].expand(b, n, -1), mlp_i[None].expand(b, n, -1)], dim=-1)
    mlp = model.branch(x)
    gmf = gmf_u[:, None] * gmf_i[None]
    return model.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


def split_neumf(model, users, items):
    gmf_u, mlp_u = model.user_repr(users).chunk(2, dim=-1)
    gmf_i, mlp_i = model.item_repr(items).chunk(2, dim=-1)
    first = model.branch.linears[0]
    w_u, w_i = first.weight.chunk(2, dim=1)
    mlp = model.branch.from_first(F.linear(mlp_u, w_u, first.bias)[:, None] + F.linear(mlp_i, w_i)[None])
    w = model.output.weight[0]
    d = gmf_u.shape[-1]
    return (gmf_u * w[:d]) @ gmf_i.t() + mlp @ w[d:] + model.output.bias


def train_impls(model, naive, split, args, target):
    """Training steps (forward + backward of a softmax loss over the candidates) through
    rankfast's ``training_scores`` and the PyTorch rows, and a check of their gradients."""

    def step(m, fn):
        def run():
            m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(m, *args).float(), target)
            loss.backward()
            return loss.detach()

        return run

    impls = {
        "rankfast": step(model, training_scores),
        "eager": step(model, naive),
        "eager-split": step(model, split),
        **{name: step(model, fn) for name, fn in compile_variants(naive, split).items()},
    }

    def flat_grads(m):
        return torch.cat([p.grad.double().reshape(-1) for p in m.parameters()])

    def check(case):
        """All gradients against the float64 eager model: rankfast's within 2e-2 or 1.5x the eager
        bf16 code's own error (bf16 gradients are a few % off float64); the other PyTorch rows
        within 5e-2 or 3x (the split formulation rounds its per-user and per-item terms to bf16
        separately, about twice eager's error; the check is for wrong gradients, ~100% off)."""
        model64 = copy.deepcopy(model).double()
        step(model64, naive)()
        want = flat_grads(model64)
        errs = {}
        for name in list(case.impls):
            if first_call(case, name)[0]:
                errs[name] = float((flat_grads(model) - want).norm() / want.norm())
        for name, err in errs.items():
            bound = max(2e-2, 1.5 * errs["eager"]) if name == "rankfast" else max(5e-2, 3 * errs["eager"])
            assert err < bound, f"{name} gradients vs float64: {errs}"

    return impls, check


def train_case(kind, dtype=torch.bfloat16):
    b, n = _sizes((1024, 512), (4, 20))
    torch.manual_seed(0)
    if kind == "mlp":
        model, naive, split = MLPModel(MLPConfig(b, 4 * n, D, hidden=HIDDEN)), eager_mlp, split_mlp
    else:
        model, naive, split = NeuMF(NeuMFConfig(b, 4 * n, D, hidden=HIDDEN)), eager_neumf, split_neumf
    model = model.to(DEVICE, dtype).train()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    target = torch.arange(b, device=DEVICE) % n  # each user's positive among the shared candidates
    impls, check = train_impls(model, naive, split, (users, items), target)
    # forward + two backward matmuls per layer
    case = Case(f"train {kind} bf16 B={b} N={n}", impls, None, flops={"*": 3 * mlp_flops(HIDDEN, b * n)})
    case.check = lambda: check(case)
    return case


def train_din_case(dtype=torch.bfloat16):
    b, n, length = _sizes((256, 128, 100), (3, 12, 5))
    torch.manual_seed(0)
    model = AttentionModel(AttentionConfig(b, 4 * n, D, hidden=HIDDEN, unit_hidden=UNIT))
    model = model.to(DEVICE, dtype).train()
    users, items = torch.arange(b, device=DEVICE), torch.arange(n, device=DEVICE)
    history = torch.randint(0, 4 * n, (b, length), device=DEVICE)
    lengths = torch.full((b,), length, device=DEVICE)
    target = torch.arange(b, device=DEVICE) % n
    impls, check = train_impls(model, eager_din, split_din, (users, items, history, lengths), target)
    case = Case(f"train din bf16 B={b} N={n} L={length}", impls, None)
    case.check = lambda: check(case)
    return case


CASES = {
    "mlp-bf16": lambda: selected(mlp_case(torch.bfloat16)),
    "mlp-fp32": lambda: selected(mlp_case(torch.float32)),
    "din-bf16": lambda: selected(din_case()),
    "din-bf16-norepeat": lambda: selected(din_case(repeats=False)),
    "topk-bf16": lambda: selected(topk_case()),
    "train-mlp": lambda: selected(train_case("mlp")),
    "train-neumf": lambda: selected(train_case("neumf")),
    "train-din": lambda: selected(train_din_case()),
}
IMPLS = [
    "rankfast",
    "rankfast-op",
    "rankfast-unfused",
    "rankfast-factorized",
    *PYTORCH,
    "cublas-pair-layer",
]


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


def gpu_seconds(fn, reps: int) -> float:
    """Device time of one call: CUDA events around ``reps`` back-to-back calls (wall time on a CPU)."""
    if not HAS_CUDA:
        import time

        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


#: The references the checks compare with: always built.
REFERENCES = ("eager", "rankfast-unfused")


def selected(case: Case) -> Case:
    """``case`` with only the implementations ``BENCH_IMPLS`` names (all when it is unset)."""
    names = os.environ.get("BENCH_IMPLS", "").split()
    if names:
        case.impls = {k: v for k, v in case.impls.items() if k in names or k in REFERENCES}
    return case


@pytest.fixture(scope="module")
def ceiling():
    return measure_bf16_ceiling()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels(benchmark, cases, ceiling, case, impl):
    c = cases(case)
    if impl in c.skipped:
        pytest.skip(f"{impl}: {c.skipped[impl]}")
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
    _, peak = peak_memory(lambda: benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP), DEVICE)
    benchmark.extra_info["peak_mem_bytes"] = peak
    benchmark.extra_info["gpu_ms"] = gpu_seconds(fn, GPU_REPS) * 1e3
    flops = c.flops.get(impl, c.flops.get("*"))
    if flops:
        tflops = flops / benchmark.stats.stats.median / 1e12
        benchmark.extra_info["tflops"] = tflops
        benchmark.extra_info["gpu_tflops"] = flops / (benchmark.extra_info["gpu_ms"] / 1e3) / 1e12
        benchmark.extra_info["ceiling_tflops"] = ceiling
        benchmark.extra_info["ceiling_fraction"] = tflops / ceiling if ceiling == ceiling else None
    save_row(benchmark)


def save_row(benchmark):
    """Appends the row to ``$BENCH_ROWS`` (JSON lines, the shape of a pytest-benchmark JSON entry)
    as soon as it is measured, so a run cut short keeps it (bench/gpu_check.sh)."""
    path = os.environ.get("BENCH_ROWS")
    if not path:
        return
    stats = benchmark.stats.stats
    row = dict(
        group=benchmark.group,
        name=benchmark.name,
        extra_info=dict(benchmark.extra_info),
        stats=dict(median=stats.median, min=stats.min, rounds=stats.rounds),
    )
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
