"""Fused score + top-K (kernels/topk.py inside the MLP and attention kernels).

Exact checks use models with small integer weights and ReLU: every score is an
integer computed exactly in fp32 (and tf32) by every path, so ties are real
ties and the fused result must equal, bit for bit, ``rankfast.score(..., k=)``
on the reference backend (the model's own forward, then ``rankfast.topk``).
Repeated candidates make ties; a NaN item embedding makes NaN scores.
"""

import copy

import pytest
import torch

import rankfast
from rankfast.kernels import topk as topk_mod
from rankfast.models import AttentionConfig, AttentionModel, MLPConfig, MLPModel, NeuMF, NeuMFConfig
from rankfast.scoring.backends import fused as fused_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_USERS, NUM_ITEMS, DIM, MAX_LEN = 7, 30, 16, 19  # sqrt(DIM) = 4: dot logits stay exact
NAN_ITEM = 5


def integer_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12)))
    elif kind == "neumf":
        model = NeuMF(NeuMFConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12)))
    else:
        model = AttentionModel(
            AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(20, 12), attention="dot", normalize=False)
        )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())
        model.item_repr.embedding.weight[NAN_ITEM] = float("nan")
    return model.to(DEVICE).eval()


def history_for(users, seed=3):
    g = torch.Generator().manual_seed(seed)
    b = users.shape[0]
    history = torch.randint(0, NUM_ITEMS, (b, MAX_LEN), generator=g)
    history[history == NAN_ITEM] = 0
    lengths = torch.randint(0, 4, (b,), generator=g)  # short histories keep the logits small
    lengths[0] = 0
    return history.to(DEVICE), lengths.to(DEVICE)


def fused(kind, model, users, items, k, exclude=None, splits=0, history=None, lengths=None):
    if kind == "attention":
        return fused_backend.model_topk(
            model, users, items, history, lengths, k=k, exclude=exclude, splits=splits, precision="ieee"
        )
    return fused_backend.model_topk(model, users, items, k=k, exclude=exclude, splits=splits, precision="ieee")


def reference_topk(model, users, items, k, exclude, history, lengths, monkeypatch):
    monkeypatch.setenv("RANKFAST_BACKEND", "reference")
    return rankfast.score(
        copy.deepcopy(model).cpu(),
        users.cpu(),
        None if items is None else items.cpu(),
        k=k,
        exclude=exclude,
        history=None if history is None else history.cpu(),
        lengths=None if lengths is None else lengths.cpu(),
    )


def assert_same(got, want):
    ids, values = got
    want_ids, want_values = want
    assert ids.dtype == torch.int64 and ids.shape == want_ids.shape
    assert torch.equal(ids.cpu(), want_ids), (ids, want_ids)
    assert torch.equal(values.cpu().isnan(), want_values.isnan())
    assert torch.equal(values.cpu().nan_to_num(0.0), want_values.nan_to_num(0.0))


@pytest.mark.parametrize("kind", ["mlp", "neumf", "attention"])
@pytest.mark.parametrize("cand", ["shared", "per_user", "all"])
def test_exactly_rankfast_topk_with_ties_nan_and_exclusion(kind, cand, monkeypatch):
    model = integer_model(kind)
    users = torch.tensor([0, 3, 6, 2, 1], device=DEVICE)
    g = torch.Generator().manual_seed(1)
    if cand == "shared":
        items = torch.cat([torch.arange(NUM_ITEMS), torch.arange(12)]).to(DEVICE)  # repeats tie
    elif cand == "per_user":
        items = torch.randint(0, NUM_ITEMS, (5, 23), generator=g).to(DEVICE)
    else:
        items = None
    history, lengths = history_for(users) if kind == "attention" else (None, None)
    exclude = [[1, 2, 3], [], [NAN_ITEM, 29, 0], list(range(0, NUM_ITEMS, 2)), [7]]
    n = NUM_ITEMS if items is None else items.shape[-1]
    # (k, splits, exclusion): several tiles per split, two splits, k beyond the eligible candidates.
    for k, splits, excl in ((6, 2, exclude), (n + 4, 1, exclude), (n - 3, 2, None)):
        got = fused(kind, model, users, items, k, excl, splits, history, lengths)
        want = reference_topk(model, users, items, k, excl, history, lengths, monkeypatch)
        assert_same(got, want)


def test_csr_exclusion_and_k_zero(monkeypatch):
    model = integer_model("mlp")
    users = torch.tensor([4, 0], device=DEVICE)
    items = torch.tensor([3, 9, 3, 12, 4], device=DEVICE)
    csr = (torch.tensor([0, 2, 3]), torch.tensor([3, 12, 4]))
    got = fused_backend.model_topk(model, users, items, k=4, exclude=csr)
    assert_same(got, reference_topk(model, users, items, 4, csr, None, None, monkeypatch))
    assert (got[0][0] != 3).all()  # every position holding an excluded id is skipped
    ids, values = fused_backend.model_topk(model, users, items, k=0)
    assert ids.shape == (2, 0) and values.shape == (2, 0)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_random_float_model_against_float64_reference(kind):
    """Continuous scores: the same ids as rankfast.topk of the float64 reference scores, values close."""
    torch.manual_seed(5)
    if kind == "mlp":
        model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(24, 16), activation="gelu"))
    else:
        model = AttentionModel(AttentionConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(24, 16), unit_hidden=(20, 10)))
    model = model.to(DEVICE).eval()
    model64 = copy.deepcopy(model).double()
    users = torch.tensor([0, 3, 6, 2], device=DEVICE)
    items = torch.randperm(NUM_ITEMS)[:27].to(DEVICE)
    history, lengths = history_for(users)
    lengths = torch.tensor([0, 19, 7, 1], device=DEVICE)
    b, n = users.shape[0], items.shape[0]
    with torch.no_grad():
        if kind == "mlp":
            scores = model64(users[:, None].expand(b, n).reshape(-1), items.repeat(b)).view(b, n)
            ids, values = fused_backend.model_topk(model, users, items, k=10, splits=2, precision="ieee")
        else:
            rep = lambda t: t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])  # noqa: E731
            scores = model64(rep(users), items.repeat(b), rep(history), rep(lengths)).view(b, n)
            ids, values = fused_backend.model_topk(
                model, users, items, history, lengths, k=10, splits=2, precision="ieee"
            )
    want_values, want_pos = rankfast.topk(scores.cpu(), 10)
    assert torch.equal(ids.cpu(), items.cpu()[want_pos])
    torch.testing.assert_close(values.cpu().double(), want_values, rtol=1e-5, atol=1e-6)


def test_bfloat16_values_are_ranked_as_rounded_scores():
    """In bf16 the fused path ranks bf16-rounded scores, as topk of the unfused bf16 scores does.
    The two kernels may round differently in the last bit on a GPU (different tiles), so values
    agree within one bf16 step and each returned id's unfused score matches its value."""
    torch.manual_seed(2)
    model = MLPModel(MLPConfig(NUM_USERS, NUM_ITEMS, DIM, hidden=(24, 16))).to(DEVICE).eval().to(torch.bfloat16)
    users = torch.tensor([0, 3, 6], device=DEVICE)
    with torch.no_grad():
        scores = fused_backend.model_scores(model, users).float().cpu()
    ids, values = fused_backend.model_topk(model, users, k=9)
    assert values.dtype == torch.bfloat16
    want_values, _ = rankfast.topk(scores, 9)
    step = 2.0**-7
    torch.testing.assert_close(values.float().cpu(), want_values, rtol=step, atol=0)
    torch.testing.assert_close(scores.gather(1, ids.cpu()), values.float().cpu(), rtol=step, atol=0)
    assert (values[:, :-1] >= values[:, 1:]).all()  # best first


def test_k_is_checked():
    model = integer_model("mlp")
    users = torch.tensor([0], device=DEVICE)
    many = torch.arange(NUM_ITEMS, device=DEVICE).repeat(topk_mod.MAX_K // NUM_ITEMS + 1)  # more than MAX_K
    with pytest.raises(ValueError, match="k"):
        fused_backend.model_topk(model, users, many, k=topk_mod.MAX_K + 1)
    ids, values = fused_backend.model_topk(model, users, k=10**12)  # clamped to the candidates, as score does
    assert ids.shape == values.shape == (1, NUM_ITEMS)
    with pytest.raises(ValueError, match="k"):
        fused_backend.model_topk(model, users, k=-1)
    with pytest.raises(TypeError, match="k"):
        fused_backend.model_topk(model, users, k=2.0)


def test_topk_ops_have_fake_implementations_and_trace():
    model = integer_model("mlp")
    users = torch.tensor([0, 3], device=DEVICE)
    kw = fused_backend.op_call(model, users).kwargs
    a, c, idx = (t.detach() if t is not None else None for t in (kw["a"], kw["c"], kw["idx"]))
    op_args = (
        a,
        c,
        idx,
        None,
        None,
        [w.detach() for w in kw["weights"]],
        [b.detach() for b in kw["biases"]],
        kw["w_out"].detach(),
        kw["b_out"].detach(),
        None,
        5,
        1,
        "relu",
        "ieee",
    )
    torch.library.opcheck(
        torch.ops.rankfast.mlp_score_topk.default, op_args, test_utils=("test_schema", "test_faketensor")
    )

    class TopK(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, users):
            return fused_backend.model_topk(self.model, users, k=5, precision="ieee")

    want = TopK()(users)
    got = torch.compile(TopK(), fullgraph=True, backend="aot_eager")(users)
    assert torch.equal(got[0], want[0])
