"""The fused kernels behind rankfast.score's scorer interface (kernels/scorers.py)."""

import copy

import pytest
import torch

import rankfast
from rankfast.kernels import scorers
from rankfast.models.factorized import Footprint
from rankfast.models import (AttentionConfig, AttentionModel, DotConfig, DotModel, MLPConfig, MLPModel, NeuMF,
                             NeuMFConfig)

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
        model = AttentionModel(AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12), attention="dot",
                                               normalize=False))
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


def reference(model, users, items, history, lengths):
    m = copy.deepcopy(model).double()
    b = users.shape[0]
    items = items.expand(b, -1) if items.dim() == 1 else items
    n = items.shape[1]

    def rep(t):
        return None if t is None else t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])

    with torch.no_grad():
        return m(rep(users), items.reshape(-1), rep(history), rep(lengths)).view(b, n)


@pytest.mark.parametrize("kind", ["mlp", "neumf", "din", "dot"])
@pytest.mark.parametrize("per_user", [False, True])
def test_scorer_interface(kind, per_user):
    model = make(kind)
    users = torch.tensor([0, 3, 6, 2, 1], device=DEVICE)
    history, lengths = history_for(5) if kind in ("din", "dot") else (None, None)
    cls = scorers.fused_scorer(model)
    assert cls is (scorers.FusedAttentionScorer if kind in ("din", "dot") else scorers.FusedMLPScorer)
    scorer = cls(model, users, history, lengths)
    rows = slice(1, 4)
    if per_user:
        ids = torch.randint(0, NUM_ITEMS, (3, 11), device=DEVICE)
        expected = reference(model, users[rows], ids, *(None if t is None else t[rows] for t in (history, lengths)))
    else:
        ids = torch.randperm(NUM_ITEMS)[:17].to(DEVICE)
        expected = reference(model, users, ids, history, lengths)[rows]
    with torch.no_grad():
        got = scorer.pairs(rows, scorer.items(ids))
    assert got.shape == expected.shape
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-3  # tf32 tolerance on a GPU
    fp = cls.footprint(model, MAX_LEN)
    assert fp.pair == 1 and fp.user > 0 and fp.item > 0


def test_footprints_count_the_float32_split_terms_of_half_precision_models():
    """By hand: the split first-layer terms are float32 whatever the model's dtype, so
    a bf16 model's footprint (in bf16 elements) counts each of them twice."""
    mlp = MLPModel(MLPConfig(3, 5, 8, hidden=(16,)))
    din = AttentionModel(AttentionConfig(3, 5, 8, hidden=(16,), unit_hidden=(6,)))
    assert scorers.FusedMLPScorer.footprint(mlp, 0) == Footprint(user=8 + 16 + 8, item=8 + 16 + 8, pair=1)
    assert scorers.FusedMLPScorer.footprint(mlp.bfloat16(), 0) == Footprint(user=8 + 32 + 8, item=8 + 32 + 8, pair=1)
    assert scorers.FusedAttentionScorer.footprint(din, 10) == Footprint(user=10 * 8 + 10 * 6 + 16 + 1, item=8 + 6 + 16, pair=1)
    assert scorers.FusedAttentionScorer.footprint(din.bfloat16(), 10) == Footprint(
        user=10 * 8 + 2 * (10 * 6 + 16) + 1, item=8 + 2 * (6 + 16), pair=1)


@pytest.mark.parametrize("kind", ["mlp", "dot"])
def test_scorer_topk_with_position_exclusion(kind):
    """Integer weights: exact scores, so the fused top-K must equal rankfast.topk of the scores."""
    model = make(kind, integer=True)
    users = torch.tensor([0, 3, 6], device=DEVICE)
    history, lengths = history_for(3) if kind == "dot" else (None, None)
    scorer = scorers.fused_scorer(model)(model, users, history, lengths)
    ids = torch.cat([torch.arange(NUM_ITEMS), torch.arange(5)]).to(DEVICE)  # repeats tie
    state = scorer.items(ids)
    indptr, positions = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 31, 4, 7, 34])
    mask = scorers.positions_bitmask(indptr, positions, 3, ids.shape[0], DEVICE)
    with torch.no_grad():
        scores = scorer.pairs(slice(0, 3), state)
        pos, values = scorer.topk(slice(0, 3), state, 12, mask)
    want_values, want_pos = rankfast.topk(scores.cpu(), 12, exclude=(indptr, positions))
    assert torch.equal(pos.cpu(), want_pos)
    assert torch.equal(values.cpu(), want_values)


def test_unsupported_models_have_no_fused_scorer():
    assert scorers.fused_scorer(DotModel(DotConfig(3, 3, 4))) is None
    assert scorers.fused_scorer(MLPModel(MLPConfig(3, 3, 4, hidden=()))) is None
    assert scorers.fused_scorer(AttentionModel(AttentionConfig(3, 3, 4, unit_hidden=()))) is None
    assert scorers.fused_scorer(MLPModel(MLPConfig(3, 3, 4, hidden=(600,)))) is None
    assert scorers.fused_scorer(MLPModel(MLPConfig(3, 3, 4)).double()) is None  # float64: eager paths


# --- rankfast.score through the kernels (the dispatch in rankfast/scoring.py) --------------


def test_dispatch(monkeypatch):
    from rankfast import scoring
    from rankfast.models.factorized import DotScorer, MLPScorer

    monkeypatch.delenv("RANKFAST_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    mlp, din, dot = make("mlp"), make("din"), DotModel(DotConfig(3, 3, 4))
    assert scoring._select_scorer(mlp, cuda, 2**20)[0] is scorers.FusedMLPScorer
    assert scoring._select_scorer(din, cuda, 2**20)[0] is scorers.FusedAttentionScorer
    assert scoring._select_scorer(dot, cuda, 2**20)[0] is DotScorer  # no kernel: the factorized path
    assert scoring._select_scorer(mlp, cpu, 2**20)[0] is MLPScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "factorized")
    assert scoring._select_scorer(mlp, cuda, 2**20)[0] is MLPScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "reference")
    assert scoring._select_scorer(mlp, cuda, 2**20)[0] is scoring.ReferenceScorer
    monkeypatch.setenv("RANKFAST_BACKEND", "triton")
    assert scoring._select_scorer(mlp, cpu, 2**20)[0] is scorers.FusedMLPScorer
    with pytest.raises(ValueError, match="RANKFAST_BACKEND=triton"):
        scoring._select_scorer(dot, cpu, 2**20)
    monkeypatch.setenv("RANKFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="RANKFAST_BACKEND"):
        scoring._select_scorer(mlp, cpu, 2**20)


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
