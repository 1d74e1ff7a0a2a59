"""The fused backend behind rankfast.score (rankfast/scoring/backends/fused.py)."""

import pytest
import torch

import rankfast
from rankfast.kernels.topk import positions_bitmask
from rankfast.models import (
    AttentionConfig,
    AttentionModel,
    DotConfig,
    DotModel,
    MLPConfig,
    MLPModel,
    NeuMF,
    NeuMFConfig,
)
from rankfast.scoring import Footprint, select_scorer
from rankfast.scoring.backends import fused as fused_backend
from rankfast.scoring.backends.factorized import DotScorer, MLPScorer
from rankfast.scoring.backends.reference import ReferenceScorer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_USERS, NUM_ITEMS, DIM, MAX_LEN = 7, 30, 16, 9


def make(kind, integer=False, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12)))
    elif kind == "neumf":
        model = NeuMF(NeuMFConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12)))
    elif kind == "din":
        model = AttentionModel(AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12), unit_hidden=(18, 8)))
    else:  # "dot" attention, raw weights: integer-exact with integer weights (sqrt(16) = 4)
        model = AttentionModel(
            AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12), attention="dot", normalize=False)
        )
    if integer:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-2, 3, p.shape).float())
    return model.to(DEVICE).eval()


def history_for(b, seed=3):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, NUM_ITEMS, (b, MAX_LEN), generator=g)
    lengths = torch.randint(0, 4, (b,), generator=g)
    lengths[0] = 0
    return history.to(DEVICE), lengths.to(DEVICE)


def test_footprints_count_the_float32_split_terms_of_half_precision_models():
    """By hand: the split first-layer terms are float32 whatever the model's dtype, so
    a bf16 model's footprint (in bf16 elements) counts each of them twice."""
    mlp = MLPModel(MLPConfig(3, 5, 8, hidden=(16,)))
    din = AttentionModel(AttentionConfig(3, 5, 8, hidden=(16,), unit_hidden=(6,)))
    assert fused_backend.FusedMLPScorer.footprint(mlp, 0) == Footprint(user=8 + 16 + 8, item=8 + 16 + 8, pair=1)
    assert fused_backend.FusedMLPScorer.footprint(mlp.bfloat16(), 0) == Footprint(
        user=8 + 32 + 8, item=8 + 32 + 8, pair=1
    )
    assert fused_backend.FusedAttentionScorer.footprint(din, 10) == Footprint(
        user=10 * 8 + 10 * 6 + 16 + 1, item=8 + 6 + 16, pair=1
    )
    assert fused_backend.FusedAttentionScorer.footprint(din.bfloat16(), 10) == Footprint(
        user=10 * 8 + 2 * (10 * 6 + 16) + 1, item=8 + 2 * (6 + 16), pair=1
    )


@pytest.mark.parametrize("kind", ["mlp", "dot"])
def test_scorer_topk_with_position_exclusion(kind):
    """Integer weights: exact scores, so the fused top-K must equal rankfast.topk of the scores."""
    model = make(kind, integer=True)
    users = torch.tensor([0, 3, 6], device=DEVICE)
    history, lengths = history_for(3) if kind == "dot" else (None, None)
    scorer = fused_backend.scorer_for(model)(model, users, history, lengths)
    ids = torch.cat([torch.arange(NUM_ITEMS), torch.arange(5)]).to(DEVICE)  # repeats tie
    state = scorer.items(ids)
    indptr, positions = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 31, 4, 7, 34])
    with torch.no_grad():
        scores = scorer.pairs(slice(0, 3), state)
        pos, values = scorer.topk(slice(0, 3), state, 12, (indptr, positions))
    want_values, want_pos = rankfast.topk(scores.cpu(), 12, exclude=(indptr, positions))
    assert torch.equal(pos.cpu(), want_pos)
    assert torch.equal(values.cpu(), want_values)


def test_unsupported_models_have_no_fused_scorer():
    assert fused_backend.scorer_for(DotModel(DotConfig(3, 3, 4))) is None
    assert fused_backend.scorer_for(MLPModel(MLPConfig(3, 3, 4, hidden=()))) is None
    assert fused_backend.scorer_for(AttentionModel(AttentionConfig(3, 3, 4, unit_hidden=()))) is None
    assert fused_backend.scorer_for(MLPModel(MLPConfig(3, 3, 4, hidden=(600,)))) is None
    assert fused_backend.scorer_for(MLPModel(MLPConfig(3, 3, 4)).double()) is None  # float64: eager paths


# --- rankfast.score through the kernels (the dispatch in rankfast/scoring/registry.py) -------


def test_dispatch(monkeypatch):
    monkeypatch.delenv("RANKFAST_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    mlp, din, dot = make("mlp"), make("din"), DotModel(DotConfig(3, 3, 4))
    assert select_scorer(mlp, cuda) is fused_backend.FusedMLPScorer
    assert select_scorer(din, cuda) is fused_backend.FusedAttentionScorer
    assert select_scorer(dot, cuda) is DotScorer  # no kernel: the factorized path
    assert select_scorer(mlp, cpu) is MLPScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "factorized")
    assert select_scorer(mlp, cuda) is MLPScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "reference")
    assert select_scorer(mlp, cuda) is ReferenceScorer
    for name in ("fused", "triton"):  # triton: the alias
        monkeypatch.setenv("RANKFAST_BACKEND", name)
        assert select_scorer(mlp, cpu) is fused_backend.FusedMLPScorer
        with pytest.raises(ValueError, match="RANKFAST_BACKEND=fused: the fused backend does not cover this DotModel"):
            select_scorer(dot, cpu)
    monkeypatch.setenv("RANKFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="RANKFAST_BACKEND"):
        select_scorer(mlp, cpu)


def test_dispatch_weighs_the_unit_table_by_history_reuse(monkeypatch):
    """On a GPU, ``auto`` scores DIN against shared candidates through the factorized unit table
    when the valid history slots are GPU_UNIT_TABLE_MIN_REUSE times the distinct items or more
    (counted by hand below), through the fused kernel otherwise (per-user candidates, dot
    attention, histories that rarely repeat an item, or any CPU)."""
    from rankfast.scoring.backends.factorized import AttentionScorer
    from rankfast.scoring.registry import GPU_UNIT_TABLE_MIN_REUSE

    monkeypatch.delenv("RANKFAST_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    din, dot = make("din"), make("dot")
    history = torch.tensor([[1, 2, 1, 2, 1, 9], [2, 1, 2, 1, 0, 0], [1, 1, 2, 2, 3, 3]])
    repeated = torch.tensor([5, 4, 4])  # 13 valid slots over items {1, 2}: 6.5 per item
    rare = torch.tensor([2, 2, 6])  # 10 valid slots over items {1, 2, 3}: 3.3 per item
    assert 10 / 3 < GPU_UNIT_TABLE_MIN_REUSE <= 6.5
    assert select_scorer(din, cuda, history, repeated) is AttentionScorer
    assert select_scorer(din, cuda, history, rare) is fused_backend.FusedAttentionScorer
    assert select_scorer(din, cuda, history, repeated, shared=False) is fused_backend.FusedAttentionScorer
    assert select_scorer(dot, cuda, history, repeated) is fused_backend.FusedAttentionScorer
    assert select_scorer(din, cpu, history, rare) is AttentionScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "fused")  # a forced backend is never second-guessed
    assert select_scorer(din, cuda, history, repeated) is fused_backend.FusedAttentionScorer


def test_positions_bitmask_sets_one_bit_per_excluded_position():
    """By hand: rows 0 and 2 exclude positions {0, 31} and {4, 7, 34} (34 twice) of 40 candidates."""
    indptr, positions = torch.tensor([0, 2, 2, 6]), torch.tensor([0, 31, 4, 7, 34, 34])
    mask = positions_bitmask(indptr, positions, 3, 40, "cpu")
    want = torch.tensor([[1 | (1 << 31), 0], [0, 0], [(1 << 4) | (1 << 7), 1 << 2]], dtype=torch.int64)
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)  # the int32 bit patterns
    assert mask.dtype == torch.int32 and torch.equal(mask, want)


@pytest.mark.parametrize("kind", ["mlp", "neumf", "dot", "din"])
@pytest.mark.parametrize("per_user", [False, True])
def test_rankfast_score_through_the_kernels(kind, per_user, monkeypatch):
    """rankfast.score with RANKFAST_BACKEND=triton against the reference backend: scores, and
    top-K with exclusion both fused (default budget) and from chunked scores (tiny budget).
    Integer weights make mlp/neumf/dot exact, so their top-K must match exactly."""
    exact = kind != "din"
    model = make(kind, integer=exact)
    users = torch.tensor([0, 3, 6, 2, 1])
    history, lengths = history_for(5) if kind in ("din", "dot") else (None, None)
    if history is not None:
        history, lengths = history.cpu(), lengths.cpu()
    items = torch.randint(0, NUM_ITEMS, (5, 12)) if per_user else torch.cat([torch.arange(NUM_ITEMS), torch.arange(6)])
    exclude = [[1, 2], [], [0, 29, 3], list(range(0, NUM_ITEMS, 3)), [7]]
    kw = dict(history=history, lengths=lengths)

    def run(backend, **extra):
        monkeypatch.setenv("RANKFAST_BACKEND", backend)
        return rankfast.score(model, users, items, **kw, **extra)

    want = run("reference")
    got = run("triton")
    assert got.shape == want.shape and got.dtype == want.dtype
    if exact:
        assert torch.equal(got.cpu(), want.cpu())
    else:
        assert float((got.cpu() - want.cpu()).norm() / want.norm()) < 1e-3
    want_ids, want_values = run("reference", k=8, exclude=exclude)
    for budget in (None, 100):  # fused score + top-K; tiny budget: chunked scores, then rankfast.topk
        extra = {} if budget is None else {"memory_budget": budget}
        ids, values = run("triton", k=8, exclude=exclude, **extra)
        if exact:
            assert torch.equal(ids.cpu(), want_ids.cpu()) and torch.equal(values.cpu(), want_values.cpu())
        else:
            torch.testing.assert_close(values.cpu(), want_values.cpu(), rtol=1e-3, atol=1e-4)
