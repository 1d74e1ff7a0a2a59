"""Shared test helpers (imported by test modules; pytest puts this folder on sys.path):
a zoo of small models, the float64 scoring oracle, tolerant ranking comparisons and
planted training data."""

from __future__ import annotations

import copy

import numpy as np
import torch

from rankfast.data import Field, Interactions, build_features
from rankfast.models import (
    GMF,
    AttentionConfig,
    AttentionModel,
    DCNConfig,
    DCNv2,
    DeepFM,
    DeepFMConfig,
    DotConfig,
    DotModel,
    FMConfig,
    FMModel,
    GMFConfig,
    ItemItem,
    ItemItemConfig,
    MLPConfig,
    MLPModel,
    NeuMF,
    NeuMFConfig,
    RecommenderNet,
    RecommenderNetConfig,
    SASRec,
    SASRecConfig,
)

NUM_USERS, NUM_ITEMS, DIM = 7, 31, 6

# Feature fields of every side and kind, fitted (the field models' CASES: tables left at the
# out-of-vocabulary rows, tests/test_field_models.py fills them).
FIELDS = (
    Field("age", "user", vocab=("20s", "30s", "40s")),
    Field("genres", "item", "multi", vocab=("a", "b", "c", "d", "e"), max_len=3),
    Field("year", "item", buckets=5),
    Field("price", "item", "dense", dim=2),
    Field("hour", "context", vocab=tuple(str(h) for h in range(24))),
    Field("moods", "context", "multi", vocab=("x", "y", "z"), max_len=2, pooling="sum"),
    Field("temperature", "context", "dense", dim=1),
)
SIDE_FIELDS = tuple(f for f in FIELDS if f.side != "context")

# Small models with awkward widths; dropout is present everywhere it exists
# (it must be off whenever scores are compared).
CASES = {
    "dot": (DotModel, DotConfig, {}),
    "gmf": (GMF, GMFConfig, {}),
    "mlp": (MLPModel, MLPConfig, dict(hidden=(9, 5), activation="gelu", dropout=0.3)),
    "mlp-linear": (MLPModel, MLPConfig, dict(hidden=())),
    "neumf": (NeuMF, NeuMFConfig, dict(hidden=(10, 4), activation="silu", dropout=0.2)),
    "neumf-sizes": (NeuMF, NeuMFConfig, dict(hidden=(9, 4), gmf_dim=3, mlp_dim=5)),
    "din": (AttentionModel, AttentionConfig, dict(hidden=(8,), unit_hidden=(7, 3), dropout=0.25)),
    "din-raw": (AttentionModel, AttentionConfig, dict(unit_hidden=(5,), normalize=False, activation="gelu")),
    "dot-attention": (AttentionModel, AttentionConfig, dict(attention="dot", hidden=(8, 3), dropout=0.1)),
    "dot-attention-raw": (AttentionModel, AttentionConfig, dict(attention="dot", normalize=False)),
    "mlp-features": (MLPModel, MLPConfig, dict(hidden=(9,), user_feature_dim=5, item_feature_dim=3)),
    "din-features": (AttentionModel, AttentionConfig, dict(hidden=(4,), unit_hidden=(6,), item_feature_dim=4)),
    # Hybrid sides: ID embedding + projected features (random ID parts here, unlike the zero init).
    "dot-hybrid": (
        DotModel,
        DotConfig,
        dict(user_feature_dim=5, user_hybrid=True, item_feature_dim=3, item_hybrid=True),
    ),
    "mlp-hybrid": (MLPModel, MLPConfig, dict(hidden=(9,), item_feature_dim=3, item_hybrid=True)),
    "neumf-hybrid": (
        NeuMF,
        NeuMFConfig,
        dict(hidden=(10, 4), user_feature_dim=2, item_feature_dim=3, item_hybrid=True),
    ),
    "din-hybrid": (
        AttentionModel,
        AttentionConfig,
        dict(hidden=(4,), unit_hidden=(6,), item_feature_dim=4, item_hybrid=True),
    ),
    # Feature fields: factorization machines and DCN-v2 on every kind of field (context too), the
    # other models with user and item fields folded into the ids' vectors (DIN: history items' fields).
    "fm": (FMModel, FMConfig, dict(fields=FIELDS)),
    "deepfm": (DeepFM, DeepFMConfig, dict(fields=FIELDS, hidden=(9, 5), activation="gelu", dropout=0.2)),
    "dcn": (DCNv2, DCNConfig, dict(fields=FIELDS, cross_layers=2, hidden=(7,), dropout=0.1)),
    "din-fields": (AttentionModel, AttentionConfig, dict(fields=SIDE_FIELDS, hidden=(5,), unit_hidden=(4,))),
    "recnet": (RecommenderNet, RecommenderNetConfig, dict(fields=SIDE_FIELDS, classes=(1, 2, 3, 4.5), hidden=(6,))),
    # max_len 4 is below the tests' history lengths, so histories are cut to their last items.
    "sasrec": (SASRec, SASRecConfig, dict(max_len=4, num_layers=2, num_heads=2, dropout=0.2)),
    "sasrec-features": (SASRec, SASRecConfig, dict(max_len=8, num_layers=1, item_feature_dim=3, item_hybrid=True)),
    # Item-item weights: the width is the catalogue's, and the user rows are dense random ones here.
    "itemitem": (ItemItem, ItemItemConfig, dict(dim=NUM_ITEMS)),
}


def make_model(name, seed=0, dtype=torch.float64):
    """A model of case ``name`` with every parameter random (biases too), in ``dtype``."""
    cls, config_cls, fields = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    config = config_cls(NUM_USERS, NUM_ITEMS, **{"dim": DIM, **fields})
    features = {}
    if config.user_feature_dim:
        features["user_features"] = torch.randn(NUM_USERS, config.user_feature_dim, generator=gen)
    if config.item_feature_dim:
        features["item_features"] = torch.randn(NUM_ITEMS, config.item_feature_dim, generator=gen)
    model = cls(config, **features).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return model


def random_history(num_users, max_len, seed=1, num_items=NUM_ITEMS):
    """Histories whose lengths cycle through 0..max_len, padded with -1."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.arange(num_users) % (max_len + 1)
    history = torch.randint(0, num_items, (num_users, max_len), generator=gen)
    history[torch.arange(max_len) >= lengths[:, None]] = -1
    return history, lengths


def pair_forward(model, users, candidates, history=None, lengths=None):
    """``[B, N]`` scores of ``users [B]`` against ``candidates`` (``[N]`` shared or ``[B, N]``)
    from the model's own forward over the expanded aligned pairs (differentiable)."""
    b = users.shape[0]
    candidates = candidates.expand(b, -1) if candidates.dim() == 1 else candidates
    n = candidates.shape[1]

    def per_pair(t):
        return None if t is None else t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])

    return model(per_pair(users), candidates.reshape(-1), per_pair(history), per_pair(lengths)).view(b, n)


def reference_scores(model, users, candidates, history=None, lengths=None):
    """The oracle of every fast path: :func:`pair_forward` in float64, on a copy of the model
    in eval mode (dropout off), without autograd."""
    with torch.no_grad():
        return pair_forward(copy.deepcopy(model).double().eval(), users, candidates, history, lengths)


#: Interaction rows of :func:`random_features` (its context values).
ROWS = 40


def random_features(seed=0, num_rows=ROWS):
    """Raw values of every field in ``FIELDS`` (some unknown categories and empty bags), encoded."""
    rng = np.random.default_rng(seed)
    return build_features(
        FIELDS,
        num_users=NUM_USERS,
        num_items=NUM_ITEMS,
        num_rows=num_rows,
        user={"age": rng.choice(["20s", "30s", "40s", "50s"], NUM_USERS)},
        item={
            "genres": [list(rng.choice(list("abcdeq"), rng.integers(0, 4), replace=False)) for _ in range(NUM_ITEMS)],
            "year": rng.integers(1990, 2000, NUM_ITEMS),
            "price": rng.normal(size=(NUM_ITEMS, 2)),
        },
        context={
            "hour": rng.integers(0, 24, num_rows),
            "moods": [list(rng.choice(list("xyz"), rng.integers(0, 3))) for _ in range(num_rows)],
            "temperature": rng.normal(size=num_rows),
        },
    )


def context_rows(features, rows):
    """The context values of interaction ``rows`` of ``features``, as tensors (a request's context)."""
    return {k: torch.from_numpy(v[rows]) for k, v in features.context.values.items()}


def context_scores(model, users, candidates, context):
    """The float64 forward over every (user, candidate) pair, each with its user's context."""
    b = len(users)
    cand = candidates.expand(b, -1)
    n = cand.shape[1]
    per_pair = {k: v[:, None].expand(b, n, *v.shape[1:]).reshape(b * n, *v.shape[1:]) for k, v in context.items()}
    twin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return twin(users[:, None].expand(b, n).reshape(-1), cand.reshape(-1), context=per_pair).view(b, n)


def rel_err(got, expected) -> float:
    """``|got - expected| / |expected|`` (Frobenius norms) in float64."""
    return float((got.detach().double() - expected.detach().double()).norm() / expected.detach().double().norm())


#: Tolerance for float32 scores of O(1) computed two ways (another batch shape, another CPU's
#: BLAS kernels, float64): summation order moves the last bits of each term, so the error is
#: relative to the terms' size, not to a small score's; an absolute part covers that.
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6


def assert_score_and_select(model, users, items, want, *, context=None, rtol=1e-4):
    """``rankfast.score`` of ``users`` (5 of them) against ``items`` (None, ``[N]`` or ``[B, N]``)
    within ``rtol`` of ``want`` (float64 ``[B, N]``) in one block and in many (a 3,000-byte
    budget), and its top-3 with exclusions: the best 3 values of ``want`` among the kept
    candidates, each id the kept candidate whose reference score is its value. For scorers
    without a fused top-K (``rankfast.score`` selects)."""
    import rankfast

    for budget in (rankfast.scoring.DEFAULT_MEMORY_BUDGET, 3000):
        got = rankfast.score(model, users, items, context=context, memory_budget=budget)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got, want) < rtol, budget
    exclude = [[4], [], [9, 22], [], [0]]
    ids, values = rankfast.score(model, users, items, context=context, k=3, exclude=exclude)
    cand = (torch.arange(want.shape[1], device=users.device) if items is None else items).expand(len(users), -1)
    for row, skip in enumerate(exclude):
        kept = ~torch.isin(cand[row], torch.tensor(skip, dtype=cand.dtype, device=cand.device))
        assert rel_err(values[row], want[row][kept].topk(3).values) < rtol
        assert set(ids[row].tolist()) <= set(cand[row][kept].tolist())
        # Each id is the candidate its value scores: its reference score is that value.
        scored = torch.stack([want[row][cand[row] == i][0] for i in ids[row]])
        assert rel_err(values[row], scored) < rtol


def assert_rankings_match(got_ids, got_scores, want_ids, want_scores, *, rtol=SCORE_RTOL, atol=SCORE_ATOL):
    """Two best-first lists of one user (ids and scores) agree up to float rounding.

    Scores agree rank by rank within the tolerance. Ids agree too, except where
    the two computations may order a near-tie differently: an id may differ at a
    rank only if the reference holds it at a rank whose score is within the
    tolerance of this rank's score, or, when the reference list does not hold it
    at all, if its score ties the reference's last one (it was cut at the boundary).
    """
    got_ids, want_ids = list(got_ids), list(want_ids)
    got_scores = np.asarray(got_scores, dtype=np.float64)
    want_scores = np.asarray(want_scores, dtype=np.float64)
    assert len(got_ids) == len(want_ids) == len(got_scores) == len(want_scores), (got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=rtol, atol=atol)
    tol = 2 * (atol + rtol * np.abs(want_scores))  # both sides may have rounded
    position = {item: rank for rank, item in enumerate(want_ids)}
    for rank, (got, want) in enumerate(zip(got_ids, want_ids, strict=True)):
        if got == want:
            continue
        other = position.get(got, len(want_ids) - 1)
        near = abs(want_scores[other] - want_scores[rank]) <= max(tol[other], tol[rank])
        assert near, f"rank {rank}: got item {got!r}, want {want!r}, and their scores are not a near-tie"


# --- training --------------------------------------------------------------------------------

QUIET = {"progress": False}


def planted(n_users=120, n_items=60, groups=4, per_user=12, seed=0):
    """Users of group g interact only with items of group g; every item is
    about equally popular, so popularity cannot tell the groups apart."""
    rng = np.random.default_rng(seed)
    users, items, stamps, ratings = [], [], [], []
    group_items = np.array_split(rng.permutation(n_items), groups)
    for u in range(n_users):
        mine = group_items[u % groups]
        picked = rng.choice(mine, size=min(per_user, len(mine)), replace=False)
        users += [u] * len(picked)
        items += picked.tolist()
        stamps += rng.permutation(len(picked)).tolist()
        ratings += (2 + (u % 2) + 2 * (picked % 3 == 0)).tolist()  # a user effect plus an item effect
    return Interactions.from_raw(users, items, ratings, stamps)


def dot_model(data, dim=16, seed=0):
    torch.manual_seed(seed)
    return DotModel(DotConfig(num_users=data.num_users, num_items=data.num_items, dim=dim))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, **tol):
    """Two state dicts are equal (exactly, or within ``tol`` for ``torch.testing.assert_close``)."""
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k
