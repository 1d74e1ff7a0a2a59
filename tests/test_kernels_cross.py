"""Fused DCN-v2 scoring (kernels/cross_score.py) against the float64 forward.

Runs under TRITON_INTERPRET=1 on a CPU (tiny sizes) and unchanged on a GPU. The
fields make ``D = (2 + fields) x dim`` no power of two (45, 54), the hidden widths
neither; every case has a request context, so ``x0`` is gathered from the user's
and the context's columns and the item's.
"""

import copy

import numpy as np
import pytest
import torch

import rankfast
from rankfast.kernels import cross_score as cs
from rankfast.models import DCNConfig, DCNv2
from rankfast.scoring import BACKEND_ENV, select_scorer, trains_fused
from rankfast.scoring.backends import fused

from helpers import (
    FIELDS,
    NUM_ITEMS,
    NUM_USERS,
    assert_score_and_select,
    context_rows,
    context_scores,
    random_features,
    reference_scores,
    rel_err,
)
from op_tracing import assert_op_traces

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
USERS = [3, 0, 6, 6, 1]


def dcn(cross_layers, hidden, dim=6, activation="relu", seed=0):
    """A float32 DCN-v2 on every kind of field (context too), every parameter random."""
    config = DCNConfig(
        NUM_USERS, NUM_ITEMS, dim, fields=FIELDS, cross_layers=cross_layers, hidden=hidden, activation=activation
    )
    model = DCNv2(config, features=random_features(seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # biases too, so padding mistakes show
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(DEVICE).eval()


def candidates(kind):
    gen = torch.Generator().manual_seed(2)
    if kind == "all":
        return None
    if kind == "shared":  # with a repeat
        return torch.tensor([4, 17, 4, 30, 0, 9, 22, 13, 5], device=DEVICE)
    return torch.randint(0, NUM_ITEMS, (len(USERS), 11), generator=gen).to(DEVICE)


def context():
    return {k: v.to(DEVICE) for k, v in context_rows(random_features(), np.array([4, 8, 15, 16, 23])).items()}


MODELS = [  # (cross layers, hidden, dim, activation): D = 9 x dim
    (1, (7,), 6, "relu"),
    (3, (9, 5), 5, "gelu"),
    (2, (), 6, "relu"),  # the cross network alone
    (2, (12, 10, 6, 5), 5, "silu"),  # the deepest MLP the kernel takes
]


@pytest.mark.parametrize("cross_layers,hidden,dim,activation", MODELS)
@pytest.mark.parametrize("kind", ["all", "shared", "per_user"])
def test_scores_match_the_float64_forward(cross_layers, hidden, dim, activation, kind, monkeypatch):
    model = dcn(cross_layers, hidden, dim, activation)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    assert select_scorer(model, torch.device(DEVICE)) is fused.FusedDCNScorer
    users, items, ctx = torch.tensor(USERS, device=DEVICE), candidates(kind), context()
    cand = torch.arange(NUM_ITEMS, device=DEVICE) if items is None else items
    want = context_scores(model, users, cand, ctx)
    assert_score_and_select(model, users, items, want, context=ctx)


@pytest.mark.parametrize("kind", ["shared", "per_user"])
def test_tiles_spanning_several_users(kind, monkeypatch):
    """Multi-user tiles (TILE_U, an autotune choice on a GPU), forced: 5 users in tiles of 4,
    N not a multiple of the tile's candidates."""
    import triton

    block_p, tile_u = (32, 4) if DEVICE == "cpu" else (128, 8)
    config = triton.Config({"BLOCK_P": block_p, "BJ": 16, "TILE_U": tile_u}, num_warps=4)
    monkeypatch.setattr(cs._cross_fwd_kernel, "configs", [config])
    model = dcn(2, (9, 5))
    users, items = torch.tensor(USERS, device=DEVICE), candidates(kind)
    with torch.no_grad():
        got = fused.model_scores(model, users, items, precision="ieee")
    assert rel_err(got, reference_scores(model, users, items)) < 1e-4


def test_model_scores_take_the_default_context():
    """``fused.model_scores`` (one op call; no context: every context field out of vocabulary)."""
    model = dcn(2, (7,))
    users = torch.tensor([3, 0, 6], device=DEVICE)
    for items in (candidates("shared"), torch.randint(0, NUM_ITEMS, (3, 4), device=DEVICE)):
        with torch.no_grad():
            got = fused.model_scores(model, users, items, precision="ieee")
        assert rel_err(got, reference_scores(model, users, items)) < 1e-4


@pytest.mark.parametrize("hidden", [(7,), ()])
def test_bfloat16_within_design_tolerance(hidden, monkeypatch):
    """A bf16 model scores within 2e-2 of the float32 model's float64 forward: bf16 rows,
    weights and split terms, fp32 accumulation and cross state."""
    model = dcn(2, hidden)
    low = copy.deepcopy(model).to(torch.bfloat16)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    users, items, ctx = torch.tensor(USERS, device=DEVICE), candidates("per_user"), context()
    got = rankfast.score(low, users, items, context=ctx)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, context_scores(model, users, items, ctx)) < 2e-2


def test_tf32_within_design_tolerance():
    model = dcn(2, (7,))
    users, items = torch.tensor([3, 0, 6], device=DEVICE), candidates("shared")
    with torch.no_grad():
        got = fused.model_scores(model, users, items, precision="tf32")
    assert rel_err(got, reference_scores(model, users, items)) < 1e-3


def test_scoring_only_and_its_limits(monkeypatch):
    model = dcn(2, (7,))
    users = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.model_scores(model, users)  # autograd records: no backward to give
    with pytest.raises(ValueError, match="no fused score"):
        fused.model_topk(model, users, k=2)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    with pytest.raises(ValueError, match="do not train it"):
        trains_fused(model)
    assert fused.scorer_for(dcn(cs.MAX_CROSS_LAYERS + 1, (7,))) is None
    # Past 64 coordinates (D = 9 x 8 = 72, a 128-wide tile) 3 layers would spill: 2 is the most.
    assert fused.scorer_for(dcn(cs.MAX_WIDE_CROSS_LAYERS, (7,), dim=8)) is not None
    assert fused.scorer_for(dcn(cs.MAX_WIDE_CROSS_LAYERS + 1, (7,), dim=8)) is None
    assert fused.scorer_for(dcn(cs.MAX_CROSS_LAYERS, (7,), dim=7)) is not None  # D = 63 takes 4
    assert fused.scorer_for(dcn(1, (7,), dim=cs.MAX_CROSS_WIDTH // 9 + 1)) is None  # D over the widest
    assert fused.scorer_for(dcn(1, (8, 8, 8, 8, 8))) is None
    assert fused.scorer_for(model.double()) is None


def _op_args(model, users, items):
    adapter = fused._DCNAdapter(model)
    kw = dict(adapter.users(users), **adapter.items(items), idx=None, **adapter.layers)
    return kw


def test_op_level_inputs_are_checked():
    model = dcn(2, (7,))
    with torch.no_grad():
        kw = _op_args(model, torch.tensor([0, 1], device=DEVICE), torch.arange(5, device=DEVICE))
        with pytest.raises(ValueError, match="idx"):
            cs.cross_score(**dict(kw, idx=torch.tensor([0, 5], device=DEVICE)))
        with pytest.raises(ValueError, match="cross_weights"):
            cs.cross_score(**dict(kw, cross_weights=kw["cross_weights"][:1]))
        with pytest.raises(ValueError, match=r"cross_weights\[0\]: expected \[53, 53\]"):
            cs.cross_score(**dict(kw, xu=kw["xu"][:, :-1]))
        with pytest.raises(ValueError, match="xu, xi"):
            cs.cross_score(**dict(kw, xu=kw["xu"][None]))
        with pytest.raises(ValueError, match="a, c, w_deep"):
            cs.cross_score(**dict(kw, c=None))
        with pytest.raises(TypeError, match="xi"):
            cs.cross_score(**dict(kw, xi=kw["xi"].double()))
        with pytest.raises(ValueError, match="activation"):
            cs.cross_score(**dict(kw, activation="tanh"))
        # 3 layers past 64 coordinates (D = 72) would spill registers: the op takes 2.
        kw = _op_args(dcn(3, (7,), dim=8), torch.tensor([0, 1], device=DEVICE), torch.arange(5, device=DEVICE))
        with pytest.raises(ValueError, match=r"expected 1\.\.2 cross layers with one bias each at width Du \+ Di = 72"):
            cs.cross_score(**kw)


def test_op_matches_its_fake_and_traces_without_graph_breaks():
    """torch.library.opcheck (schema, fake tensors, AOT dispatch), then
    torch.compile(fullgraph=True) and torch.export through the op."""
    model = dcn(2, (7,)).requires_grad_(False)
    users, items = torch.tensor([0, 3, 6], device=DEVICE), candidates("shared")
    kw = _op_args(model, users, torch.arange(NUM_ITEMS, device=DEVICE))
    names = ["xu", "xi", "idx", "cross_weights", "cross_biases", "w_cross", "a", "c", "weights", "biases", "w_deep"]
    args = (*(dict(kw, idx=items)[k] for k in names), kw["b_out"], "relu", "ieee")
    assert_op_traces(
        torch.ops.rankfast.cross_score.default,
        args,
        model,
        lambda m, u, i: fused.model_scores(m, u, i, precision="ieee"),
        (users, items),
        differentiable=False,
    )
