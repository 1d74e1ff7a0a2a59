"""Fused MLP scoring kernels (kernels/mlp_score.py) against the float64 reference models.

Runs under TRITON_INTERPRET=1 on a CPU (tiny sizes) and unchanged on a GPU.
Shapes are deliberately awkward: B and N not multiples of the tile, one
candidate, widths that are not powers of two.
"""

import copy

import pytest
import torch

import rankfast
from rankfast.kernels import mlp_score as ms
from rankfast.models import MLPConfig, MLPModel, NeuMF, NeuMFConfig
from rankfast.scoring import BACKEND_ENV
from rankfast.scoring.backends import fused as fused_backend

from helpers import pair_forward, rel_err
from op_tracing import assert_op_traces

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_USERS, NUM_ITEMS, DIM = 9, 41, 12


def make(kind, hidden, activation="relu", seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=hidden, activation=activation), **kw)
    else:
        model = NeuMF(NeuMFConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=hidden, activation=activation), **kw)
    for p in model.parameters():  # non-zero biases everywhere, so padding mistakes show
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE)


def candidates(kind, b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "shared":
        return torch.randperm(NUM_ITEMS, generator=g)[:n].to(DEVICE)
    return torch.randint(0, NUM_ITEMS, (b, n), generator=g).to(DEVICE)


CASES = [
    ("mlp", (40,), "relu"),
    ("mlp", (40, 24), "gelu"),
    ("mlp", (33, 24, 20), "silu"),
    ("mlp", (40, 24, 20, 17), "relu"),
    ("neumf", (30,), "relu"),
    ("neumf", (30, 20), "silu"),
]


@pytest.mark.parametrize("kind,hidden,activation", CASES)
@pytest.mark.parametrize("cand", ["shared", "per_user"])
def test_forward_and_gradients_match_float64_reference(kind, hidden, activation, cand):
    model = make(kind, hidden, activation)
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([0, 3, 8, 2, 1], device=DEVICE)
    items = candidates(cand, 5, 37 if cand == "shared" else 13)

    got = fused_backend.model_scores(model, users, items, precision="ieee")
    expected = pair_forward(model64, users, items)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-4

    weight = torch.randn(expected.shape, dtype=torch.float64, device=DEVICE)
    (got * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters(), strict=True):
        assert p.grad is not None, name
        assert rel_err(p.grad, p64.grad) < 1e-4, name


@pytest.mark.parametrize("kind,hidden,activation", [CASES[1], CASES[4]])
@pytest.mark.parametrize("cand", ["shared", "per_user"])
def test_gradients_with_tiles_spanning_several_users(kind, hidden, activation, cand, monkeypatch):
    """The backward's multi-user tiles (TILE_U, an autotune choice on a GPU), forced:
    B=5 users in tiles of 4, N not a multiple of the tile's candidates."""
    import triton

    block_p, tile_u = (32, 4) if DEVICE == "cpu" else (128, 8)
    monkeypatch.setattr(
        ms._mlp_bwd_kernel, "configs", [triton.Config({"BLOCK_P": block_p, "BJ": 16, "TILE_U": tile_u}, num_warps=4)]
    )
    model = make(kind, hidden, activation)
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([0, 3, 8, 2, 1], device=DEVICE)
    items = candidates(cand, 5, 37 if cand == "shared" else 13)
    weight = torch.randn(5, items.shape[-1], dtype=torch.float64, device=DEVICE)
    (fused_backend.model_scores(model, users, items, precision="ieee") * weight.float()).sum().backward()
    (pair_forward(model64, users, items) * weight).sum().backward()
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters(), strict=True):
        assert rel_err(p.grad, p64.grad) < 1e-4, name


@pytest.mark.parametrize("cand", ["shared", "per_user"])
def test_backward_workspaces_and_bitwise_repeatability(cand, monkeypatch):
    """The backward's programs forced into 2 user groups x 2 candidate groups, each adding into its
    own slots of the workspaces (no atomics), summed afterwards: gradients against float64, and the
    same bit for bit on a second run (on a GPU the programs run concurrently)."""
    monkeypatch.setattr(ms, "ownership", lambda *args: (2, 2))
    model = make("neumf", (30, 20), "relu")
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([0, 3, 8, 2, 1], device=DEVICE)
    items = candidates(cand, 5, 37 if cand == "shared" else 13)
    weight = torch.randn(5, items.shape[-1], dtype=torch.float64, device=DEVICE)
    runs = []
    for _ in range(2):
        model.zero_grad()
        (fused_backend.model_scores(model, users, items, precision="ieee") * weight.float()).sum().backward()
        runs.append([p.grad.clone() for p in model.parameters()])
    (pair_forward(model64, users, items) * weight).sum().backward()
    for first, second, (name, p64) in zip(*runs, model64.named_parameters(), strict=True):
        assert torch.equal(first, second), name
        assert rel_err(first, p64.grad) < 1e-4, name


def test_deterministic_algorithms_mode_is_honoured():
    """Under torch.use_deterministic_algorithms(True) the fused backward runs (its kernels have no
    atomics; per-user candidates reach the item rows through index_put_(accumulate=True), which
    PyTorch then makes deterministic) and gives the same gradients."""
    model = make("mlp", (40, 24), "relu")
    users = torch.tensor([0, 3, 8, 2, 1], device=DEVICE)
    items = candidates("per_user", 5, 13)  # 65 >= 41 items: indexes the item table, with repeats
    grads = []
    for deterministic in (False, True):
        model.zero_grad()
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            fused_backend.training_scores(model, users, items).square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(before)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("b,n", [(1, 1), (3, 1), (1, 5)])
def test_tiny_shapes(b, n):
    model = make("mlp", (20, 18), "gelu")
    model64 = copy.deepcopy(model).double()
    users = torch.arange(b, device=DEVICE)
    for items in (candidates("shared", b, n), candidates("per_user", b, n)):
        got = fused_backend.model_scores(model, users, items, precision="ieee")
        assert rel_err(got, pair_forward(model64, users, items)) < 1e-4


def test_every_item_and_per_user_table_path():
    """items=None scores every item; per-user candidates with B*N >= M index the whole item table."""
    model = make("neumf", (24, 16), "relu")
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([4, 4, 0], device=DEVICE)  # a repeated user
    got = fused_backend.model_scores(model, users, precision="ieee")
    assert rel_err(got, pair_forward(model64, users, torch.arange(NUM_ITEMS, device=DEVICE))) < 1e-4
    items = candidates("per_user", 3, 20)  # 60 >= 41 items: the table path
    got = fused_backend.model_scores(model, users, items, precision="ieee")
    expected = pair_forward(model64, users, items)
    assert rel_err(got, expected) < 1e-4
    got.sum().backward()
    expected.sum().backward()
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters(), strict=True):
        assert rel_err(p.grad, p64.grad) < 1e-4, name


def test_aligned_pairs_with_feature_representations():
    """Training path: aligned (user, item) pairs, item side given by features through a projection."""
    torch.manual_seed(3)
    features = torch.randn(NUM_ITEMS, 7)
    model = MLPModel(
        MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(30, 20), item_feature_dim=7), item_features=features
    ).to(DEVICE)
    model64 = copy.deepcopy(model).double()
    users = torch.randint(0, NUM_USERS, (19,), device=DEVICE)
    items = torch.randint(0, NUM_ITEMS, (19,), device=DEVICE)
    got = fused_backend.model_scores(model, users, items[:, None], precision="ieee").squeeze(-1)  # aligned pairs
    expected = model64(users, items)
    assert got.shape == (19,) and rel_err(got, expected) < 1e-4
    torch.nn.functional.binary_cross_entropy_with_logits(got, (items % 2).float()).backward()
    torch.nn.functional.binary_cross_entropy_with_logits(expected, (items % 2).double()).backward()
    for (name, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters(), strict=True):
        assert rel_err(p.grad, p64.grad) < 1e-4, name
    assert model.item_repr.projection.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mlp", "neumf"])
def test_half_precision_within_design_tolerance(dtype, kind, monkeypatch):
    """Scores within 2e-2 of float64. Gradients: the eager model in the same
    dtype is itself off by up to ~4e-2 here (its embedding gradients sum many
    low-precision products), so each gradient must be within 2e-2 or within
    1.5x the eager half-precision model's own error, whichever is larger."""
    model = make(kind, (40, 24), "relu")
    model64 = copy.deepcopy(model).double()
    low = copy.deepcopy(model).to(dtype)
    eager = copy.deepcopy(low)
    users = torch.tensor([0, 3, 8, 2, 1], device=DEVICE)
    items = candidates("shared", 5, 37)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    with torch.no_grad():  # scoring: the split terms in the model's dtype (half-precision operands)
        scored = fused_backend.model_scores(low, users, items)
        _, top = rankfast.score(low, users, items, k=5)
    assert scored.dtype == dtype
    assert rel_err(scored, pair_forward(model64, users, items)) < 2e-2
    assert rel_err(top, pair_forward(model64, users, items).topk(5, dim=1).values) < 2e-2
    got = fused_backend.model_scores(low, users, items)  # with autograd: float32 terms
    assert got.dtype == dtype
    assert rel_err(got, pair_forward(model64, users, items)) < 2e-2
    got.float().sum().backward()
    pair_forward(eager, users, items).float().sum().backward()
    pair_forward(model64, users, items).sum().backward()
    params = zip(low.named_parameters(), eager.parameters(), model64.parameters(), strict=True)
    for (name, p), p_eager, p64 in params:
        assert rel_err(p.grad, p64.grad) < max(2e-2, 1.5 * rel_err(p_eager.grad, p64.grad)), name


def test_tf32_within_design_tolerance():
    model = make("mlp", (40, 24), "relu")
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([0, 3, 8], device=DEVICE)
    items = candidates("shared", 3, 30)
    got = fused_backend.model_scores(model, users, items, precision="tf32")
    assert rel_err(got, pair_forward(model64, users, items)) < 1e-3


def test_default_precision_follows_torch(monkeypatch):
    from rankfast.kernels._common import default_precision

    assert default_precision("tf32") == "tf32"
    with pytest.raises(ValueError, match="precision"):
        default_precision("fp8")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert default_precision(None) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert default_precision(None) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_op_level_inputs_are_checked():
    a = torch.randn(3, 20, device=DEVICE)
    c = torch.randn(5, 20, device=DEVICE)
    w_out, b_out = torch.randn(20, device=DEVICE), torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="idx"):
        ms.mlp_score(a, c, torch.tensor([0, 5], device=DEVICE), w_out=w_out, b_out=b_out)
    with pytest.raises(ValueError, match="idx"):
        ms.mlp_score(a, c, torch.zeros(2, 4, dtype=torch.long, device=DEVICE), w_out=w_out, b_out=b_out)
    with pytest.raises(TypeError, match="c"):
        ms.mlp_score(a, c.double(), w_out=w_out, b_out=b_out)
    with pytest.raises(ValueError, match="w_out"):
        ms.mlp_score(a, c, w_out=torch.randn(7, device=DEVICE), b_out=b_out)
    with pytest.raises(ValueError, match="activation"):
        ms.mlp_score(a, c, w_out=w_out, b_out=b_out, activation="tanh")
    with pytest.raises(ValueError, match="widths"):
        big = torch.randn(600, 20, device=DEVICE)
        ms.mlp_score(
            a,
            c,
            weights=[big],
            biases=[torch.zeros(600, device=DEVICE)],
            w_out=torch.randn(600, device=DEVICE),
            b_out=b_out,
        )
    with pytest.raises(TypeError, match="RankingModel"):
        fused_backend.model_scores(torch.nn.Linear(2, 2), torch.tensor([0]))
    assert fused_backend.scorer_for(MLPModel(MLPConfig(3, 3, 4, hidden=()))) is None
    assert fused_backend.scorer_for(MLPModel(MLPConfig(3, 3, 4, hidden=(8, 8, 8, 8, 8)))) is None
    assert fused_backend.scorer_for(make("neumf", (24, 16))) is fused_backend.FusedMLPScorer


def test_op_matches_its_fake_and_traces_without_graph_breaks():
    """torch.library.opcheck (schema, fake, autograd registration), then
    torch.compile(fullgraph=True) and torch.export through the op."""
    model = make("neumf", (24, 16), "relu")
    users = torch.tensor([0, 3, 8], device=DEVICE)
    items = candidates("shared", 3, 11)
    a, gu = model.user_repr(users).chunk(2, dim=-1)
    first = model.branch.linears[0]
    w_u, w_i = first.weight.chunk(2, dim=1)
    gmf_i, mlp_i = model.item_repr(items).chunk(2, dim=-1)
    args = (
        torch.nn.functional.linear(a, w_u, first.bias),
        torch.nn.functional.linear(mlp_i, w_i),
        None,
        gu * model.output.weight[0, :DIM],
        gmf_i,
        [model.branch.linears[1].weight],
        [model.branch.linears[1].bias],
        model.output.weight[0, DIM:],
        model.output.bias,
        "relu",
        "ieee",
    )
    assert_op_traces(
        torch.ops.rankfast.mlp_score.default,
        args,
        model,
        lambda m, *x: fused_backend.model_scores(m, *x, precision="ieee"),
        (users, items),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compile_forward_and_backward_on_gpu(dtype):
    model = make("mlp", (256, 128), "relu").to(dtype)
    users = torch.arange(NUM_USERS, device=DEVICE)
    items = torch.arange(NUM_ITEMS, device=DEVICE)

    def step(users, items):
        return fused_backend.model_scores(model, users, items).float().square().mean()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(users, items)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    step(users, items).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=2e-2, atol=1e-3)


@pytest.mark.gpu
def test_fused_scoring_beats_eager_in_time_and_memory_on_gpu():
    """A sanity floor, not the benchmark (bench/bench_kernels.py): bf16 MLP 256-128, 1024 x 4096 pairs."""
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(1024, 4096, 64, hidden=(256, 128))).to(DEVICE, torch.bfloat16).eval()
    users, items = torch.arange(1024, device=DEVICE), torch.arange(4096, device=DEVICE)

    def eager():
        e_u, e_i = model.user_repr(users), model.item_repr(items)
        x = torch.cat([e_u[:, None].expand(1024, 4096, -1), e_i[None].expand(1024, 4096, -1)], dim=-1)
        return model.tower(x).squeeze(-1)

    def fused():
        return fused_backend.model_scores(model, users, items)

    def timed(fn):
        with torch.inference_mode():
            fn()  # warm-up (autotuning)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                out = fn()
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end) / 5, torch.cuda.max_memory_allocated() - base

    want, eager_ms, eager_mem = timed(eager)
    got, fused_ms, fused_mem = timed(fused)
    assert rel_err(got, want.double()) < 2e-2
    assert fused_ms < eager_ms, (fused_ms, eager_ms)
    assert fused_mem * 10 < eager_mem, (fused_mem, eager_mem)
