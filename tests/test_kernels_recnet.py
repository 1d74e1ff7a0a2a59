"""Fused RecommenderNet scoring (kernels/rating_score.py) against the float64 forward.

Runs under TRITON_INTERPRET=1 on a CPU (tiny sizes) and unchanged on a GPU. Every model has
user and item fields folded into the ids' vectors; hidden widths are odd, the class values
unevenly spaced, and the class counts (2, 5, 10) none a tile width, so the padded classes'
masks and ``-inf`` biases are exercised.
"""

import copy

import pytest
import torch

import rankfast
from rankfast.kernels import rating_score as rs
from rankfast.models import RecommenderNet, RecommenderNetConfig
from rankfast.scoring import BACKEND_ENV, select_scorer, trains_fused
from rankfast.scoring.backends import fused

from helpers import (
    NUM_ITEMS,
    NUM_USERS,
    SIDE_FIELDS,
    assert_score_and_select,
    random_features,
    reference_scores,
    rel_err,
)
from op_tracing import assert_op_traces

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
USERS = [3, 0, 6, 6, 1]
CLASSES = {
    2: (0.0, 1.0),
    5: (0.5, 1.0, 2.5, 4.0, 5.0),
    10: (-1.0, 0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 4.0, 4.5, 7.0),
}


def recnet(hidden, classes=5, activation="relu", dim=6, seed=0):
    """A float32 RecommenderNet with user and item fields, every parameter random."""
    config = RecommenderNetConfig(
        NUM_USERS, NUM_ITEMS, dim, fields=SIDE_FIELDS, classes=CLASSES[classes], hidden=hidden, activation=activation
    )
    model = RecommenderNet(config, features=random_features(seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # biases too, so padding mistakes show
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(DEVICE).eval()


def candidates(kind):
    gen = torch.Generator().manual_seed(2)
    if kind == "all":
        return None
    if kind == "shared":  # with a repeat
        return torch.tensor([4, 17, 4, 30, 0, 9, 22, 13, 5], device=DEVICE)
    return torch.randint(0, NUM_ITEMS, (len(USERS), 11), generator=gen).to(DEVICE)


MODELS = [  # (hidden, classes, activation)
    ((7,), 5, "relu"),
    ((9, 5), 10, "gelu"),
    ((11, 6, 5), 2, "silu"),
    ((12, 10, 6, 5), 10, "relu"),  # the deepest MLP the kernel takes
]


@pytest.mark.parametrize("hidden,classes,activation", MODELS)
@pytest.mark.parametrize("kind", ["all", "shared", "per_user"])
def test_scores_match_the_float64_forward(hidden, classes, activation, kind, monkeypatch):
    model = recnet(hidden, classes, activation)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    assert select_scorer(model, torch.device(DEVICE)) is fused.FusedRecommenderNetScorer
    users, items = torch.tensor(USERS, device=DEVICE), candidates(kind)
    cand = torch.arange(NUM_ITEMS, device=DEVICE) if items is None else items
    want = reference_scores(model, users, cand)
    assert_score_and_select(model, users, items, want)


@pytest.mark.parametrize("kind", ["shared", "per_user"])
def test_tiles_spanning_several_users(kind, monkeypatch):
    """Multi-user tiles (TILE_U, an autotune choice on a GPU), forced: 5 users in tiles of 4,
    N not a multiple of the tile's candidates."""
    import triton

    block_p, tile_u = (32, 4) if DEVICE == "cpu" else (128, 8)
    config = triton.Config({"BLOCK_P": block_p, "BJ": 16, "TILE_U": tile_u}, num_warps=4)
    monkeypatch.setattr(rs._rating_fwd_kernel, "configs", [config])
    model = recnet((9, 5), 10)
    users, items = torch.tensor(USERS, device=DEVICE), candidates(kind)
    with torch.no_grad():
        got = fused.model_scores(model, users, items, precision="ieee")
    assert rel_err(got, reference_scores(model, users, items)) < 1e-4


@pytest.mark.parametrize("classes", [2, 10])
def test_bfloat16_within_design_tolerance(classes, monkeypatch):
    """A bf16 model scores within 2e-2 of the float32 model's float64 forward: bf16 split terms
    and weights, fp32 accumulation, logits and softmax."""
    model = recnet((9, 5), classes)
    low = copy.deepcopy(model).to(torch.bfloat16)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    users, items = torch.tensor(USERS, device=DEVICE), candidates("per_user")
    got = rankfast.score(low, users, items)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, reference_scores(model, users, items)) < 2e-2


def test_tf32_within_design_tolerance():
    model = recnet((9, 5), 10)
    users, items = torch.tensor([3, 0, 6], device=DEVICE), candidates("shared")
    with torch.no_grad():
        got = fused.model_scores(model, users, items, precision="tf32")
    assert rel_err(got, reference_scores(model, users, items)) < 1e-3


def test_scoring_only_and_its_limits(monkeypatch):
    model = recnet((7,))
    users = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.model_scores(model, users)  # autograd records: no backward to give
    with pytest.raises(ValueError, match="RecommenderNet has no fused score"):
        fused.model_topk(model, users, k=2)
    monkeypatch.setenv(BACKEND_ENV, "fused")
    with pytest.raises(ValueError, match="do not train it"):
        trains_fused(model)
    many = RecommenderNetConfig(NUM_USERS, NUM_ITEMS, 6, classes=tuple(range(rs.MAX_CLASSES + 1)), hidden=(7,))
    assert fused.scorer_for(RecommenderNet(many)) is None
    assert fused.scorer_for(recnet((8, 8, 8, 8, 8))) is None
    assert fused.scorer_for(recnet(())) is None  # no hidden layer: no pair activations to fuse
    assert fused.scorer_for(model.double()) is None


def _op_args(model, users, items):
    adapter = fused._MLPAdapter(model)
    (a, _), (c, _) = adapter.users(users), adapter.items(items)
    return dict(a=a, c=c, idx=None, **adapter.layers)


def test_op_level_inputs_are_checked():
    model = recnet((9, 5), 10)
    with torch.no_grad():
        kw = _op_args(model, torch.tensor([0, 1], device=DEVICE), torch.arange(5, device=DEVICE))
        with pytest.raises(ValueError, match="idx"):
            rs.rating_score(**dict(kw, idx=torch.tensor([0, 5], device=DEVICE)))
        with pytest.raises(ValueError, match=r"w_classes: expected \[C, 5\]"):
            rs.rating_score(**dict(kw, w_classes=kw["w_classes"][:, :4]))
        with pytest.raises(ValueError, match="w_classes"):
            rs.rating_score(**dict(kw, w_classes=kw["w_classes"][:1]))
        with pytest.raises(ValueError, match=r"class_values: expected \[10\]"):
            rs.rating_score(**dict(kw, class_values=kw["class_values"][:9]))
        with pytest.raises(ValueError, match="b_classes"):
            rs.rating_score(**dict(kw, b_classes=kw["b_classes"][None]))
        with pytest.raises(ValueError, match="weights"):
            rs.rating_score(**dict(kw, biases=kw["biases"][:0]))
        with pytest.raises(TypeError, match="b_classes"):
            rs.rating_score(**dict(kw, b_classes=kw["b_classes"].double()))
        with pytest.raises(ValueError, match="activation"):
            rs.rating_score(**dict(kw, activation="tanh"))


def test_op_matches_its_fake_and_traces_without_graph_breaks():
    """torch.library.opcheck (schema, fake tensors, AOT dispatch), then
    torch.compile(fullgraph=True) and torch.export through the op."""
    model = recnet((9, 5), 5).requires_grad_(False)
    users, items = torch.tensor([0, 3, 6], device=DEVICE), candidates("shared")
    kw = _op_args(model, users, torch.arange(NUM_ITEMS, device=DEVICE))
    names = ["a", "c", "idx", "weights", "biases", "w_classes", "b_classes", "class_values"]
    args = (*(dict(kw, idx=items)[k] for k in names), "relu", "ieee")
    assert_op_traces(
        torch.ops.rankfast.rating_score.default,
        args,
        model,
        lambda m, u, i: fused.model_scores(m, u, i, precision="ieee"),
        (users, items),
        differentiable=False,
    )
