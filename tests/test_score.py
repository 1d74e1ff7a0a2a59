"""rankfast.score: the fast path against the models' own forward, top-K, dispatch, bad input."""

import threading

import numpy as np
import pytest
import torch

import rankfast
from rankfast.scoring import DEFAULT_MEMORY_BUDGET, Footprint
from rankfast.scoring import plan as scoring_plan
from rankfast.scoring.backends import factorized

from helpers import CASES, NUM_ITEMS, NUM_USERS, make_model, random_history, reference_scores

MAX_LEN = 5
ATTENTION = [n for n, (cls, _, _) in CASES.items() if cls.uses_history]


def candidate_sets(num_users):
    gen = torch.Generator().manual_seed(2)
    return {
        "all": None,
        "one": torch.tensor([NUM_ITEMS - 1]),
        "subset-with-repeats": torch.tensor([4, 17, 4, 30, 0, 9, 17, 22, 1, 5, 13, 8, 2]),
        "per-user": torch.randint(0, NUM_ITEMS, (num_users, 9), generator=gen),
    }


def as_candidates(items):
    return torch.arange(NUM_ITEMS) if items is None else items


@pytest.fixture(params=[64, 2], ids=["one-history-block", "history-blocks-of-2"])
def history_block(request, monkeypatch):
    monkeypatch.setattr(factorized, "HISTORY_BLOCK", request.param)


@pytest.mark.parametrize("budget", [DEFAULT_MEMORY_BUDGET, 6000, 1], ids=["default", "6kB", "1B"])
@pytest.mark.parametrize("users", [[1], [0, 6, 2, 3, 5, 4]], ids=["B=1", "B=6"])
@pytest.mark.parametrize("candidates", ["all", "one", "subset-with-repeats", "per-user"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_match_reference(name, candidates, users, budget, history_block):
    model = make_model(name)
    users = torch.tensor(users)
    history, lengths = random_history(len(users), MAX_LEN)
    items = candidate_sets(len(users))[candidates]
    got = rankfast.score(model, users, items, history=history, lengths=lengths, memory_budget=budget)
    expected = reference_scores(model, users, as_candidates(items), history, lengths)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reuse", [0.0, float("inf")], ids=["unit-table", "per-slot-units"])
@pytest.mark.parametrize("candidates", ["all", "subset-with-repeats", "per-user"])
@pytest.mark.parametrize("name", ["din", "din-raw", "din-features", "din-hybrid"])
def test_din_unit_table_matches_reference(name, candidates, reuse, history_block, monkeypatch):
    """Users sharing history items: the unit tabled over distinct items (shared
    candidates) and computed per slot give the reference's scores."""
    monkeypatch.setattr(factorized, "UNIT_TABLE_MIN_REUSE", reuse)
    tabled = _spy_unit_tables(monkeypatch)
    model = make_model(name)
    users = torch.tensor([0, 6, 2, 3, 5, 4])
    lengths = torch.tensor([0, 12, 5, 12, 1, 9])
    history = torch.randint(0, 6, (6, 12), generator=torch.Generator().manual_seed(5))  # 6 items: many repeats
    history[torch.arange(12) >= lengths[:, None]] = -1
    items = candidate_sets(len(users))[candidates]
    for budget in (DEFAULT_MEMORY_BUDGET, 6000):
        got = rankfast.score(model, users, items, history=history, lengths=lengths, memory_budget=budget)
        torch.testing.assert_close(
            got, reference_scores(model, users, as_candidates(items), history, lengths), rtol=1e-10, atol=1e-12
        )
    assert tabled and all(tabled) == (reuse == 0.0)


def _spy_unit_tables(monkeypatch):
    """A list that records, per scorer built, whether it tabled the DIN unit."""
    tabled = []
    plan = factorized.AttentionScorer._plan_unit_table

    def spy(self, *args):
        plan(self, *args)
        tabled.append(self.distinct is not None)

    monkeypatch.setattr(factorized.AttentionScorer, "_plan_unit_table", spy)
    return tabled


@pytest.mark.parametrize("histories", ["repeated", "distinct"])
def test_din_unit_table_by_default_only_when_history_items_repeat(histories, monkeypatch):
    tabled = _spy_unit_tables(monkeypatch)
    model = make_model("din")
    users = torch.tensor([0, 6, 2, 3, 5, 4])
    lengths = torch.tensor([0, 8, 5, 8, 1, 8])
    gen = torch.Generator().manual_seed(6)
    if histories == "repeated":  # 30 slots over at most 6 items
        history = torch.randint(0, 6, (6, 8), generator=gen)
    else:  # 30 slots, 30 different items
        history = torch.full((6, 8), -1)
        history[torch.arange(8) < lengths[:, None]] = torch.randperm(NUM_ITEMS, generator=gen)[:30]
    history[torch.arange(8) >= lengths[:, None]] = -1
    got = rankfast.score(model, users, history=history, lengths=lengths)
    torch.testing.assert_close(
        got, reference_scores(model, users, torch.arange(NUM_ITEMS), history, lengths), rtol=1e-10, atol=1e-12
    )
    assert tabled == [histories == "repeated"]


def test_din_unit_table_is_capped_by_its_footprint():
    """More distinct history items than the footprint's table allowance: no table."""
    model = make_model("din")
    history = torch.randint(0, 6, (4, 10), generator=torch.Generator().manual_seed(7))
    lengths = torch.full((4,), 10)
    scorer = factorized.AttentionScorer(model, torch.arange(4), history, lengths)
    assert scorer.distinct is not None and factorized.AttentionScorer.footprint(model, 10).table >= len(
        scorer.distinct[0]
    )
    scorer.distinct = None
    scorer._plan_unit_table(history, max_columns=len(torch.unique(history)) - 1)
    assert scorer.distinct is None


def test_plan_counts_the_table_only_for_shared_candidates():
    fp, bare = Footprint(user=50, item=10, pair=100, table=400), Footprint(user=50, item=10, pair=100)
    args = dict(top_k=False, itemsize=4, budget=2**20, tile_bytes=40_000, workers=2)
    shared, shared_bare = (scoring_plan.make_plan(f, 10_000, 5_000, per_user=False, **args) for f in (fp, bare))
    assert shared.block_users < shared_bare.block_users
    per_user = [scoring_plan.make_plan(f, 10_000, 5_000, per_user=True, **args) for f in (fp, bare)]
    assert per_user[0] == per_user[1]


def _expected_topk(scores, candidates, exclude, k):
    """topk of the reference scores, excluded positions found by brute force."""
    skip = None
    if exclude is not None:
        skip = []
        for b, seen in enumerate(exclude):
            cand = (candidates[b] if candidates.dim() == 2 else candidates).tolist()
            skip.append([pos for pos, item in enumerate(cand) if item in set(seen)])
    values, positions = rankfast.topk(scores, k, exclude=skip)
    ids = torch.stack(
        [
            (candidates[b] if candidates.dim() == 2 else candidates)[positions[b].clamp_min(0)]
            for b in range(len(scores))
        ]
    )
    return ids.masked_fill(positions < 0, -1), values


@pytest.mark.parametrize("budget", [DEFAULT_MEMORY_BUDGET, 1], ids=["default", "1B"])
@pytest.mark.parametrize("k", [0, 3, 40])
@pytest.mark.parametrize("candidates", ["all", "subset-with-repeats", "per-user"])
@pytest.mark.parametrize("name", ["dot", "mlp", "neumf", "din", "dot-attention-raw"])
def test_topk_matches_topk_of_reference(name, candidates, k, budget):
    model = make_model(name)
    users = torch.tensor([3, 0, 6, 6, 1])
    history, lengths = random_history(len(users), MAX_LEN)
    items = candidate_sets(len(users))[candidates]
    exclude = [[4, 17, 30], [], list(range(NUM_ITEMS)), [2, 2, 9], [5]]
    cand = as_candidates(items)
    scores = reference_scores(model, users, cand, history, lengths)
    for excl in (None, exclude):
        ids, values = rankfast.score(
            model, users, items, k=k, exclude=excl, history=history, lengths=lengths, memory_budget=budget
        )
        want_ids, want_values = _expected_topk(scores, cand, excl, k)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(values, want_values, rtol=1e-10, atol=1e-12)


def test_exclude_as_csr_and_numpy_inputs():
    model = make_model("mlp")
    users = np.array([2, 5])
    seen = [[1, 2, 3], [30]]
    ids, values = rankfast.score(model, users.tolist(), k=4, exclude=seen)
    indptr, indices = np.array([0, 3, 4]), np.array([1, 2, 3, 30])
    csr_ids, csr_values = rankfast.score(model, users, k=4, exclude=(indptr, indices))
    assert torch.equal(ids, csr_ids) and torch.equal(values, csr_values)
    assert not set(ids[0].tolist()) & {1, 2, 3} and 30 not in ids[1].tolist()


@pytest.mark.parametrize("name", ["mlp", "din"])
def test_float32_within_design_tolerance(name):
    model32 = make_model(name, dtype=torch.float32)
    model64 = make_model(name)
    users = torch.arange(NUM_USERS)
    history, lengths = random_history(NUM_USERS, MAX_LEN)
    got = rankfast.score(model32, users, history=history, lengths=lengths)
    expected = reference_scores(model64, users, torch.arange(NUM_ITEMS), history, lengths)
    assert got.dtype == torch.float32
    assert ((got.double() - expected).norm() / expected.norm()) < 1e-4


def test_reference_backend(monkeypatch):
    model = make_model("din")
    users = torch.tensor([0, 4, 2])
    history, lengths = random_history(3, MAX_LEN)

    def no_fast_path(model):
        raise AssertionError("the factorized path must not run")

    monkeypatch.setattr(factorized, "scorer_for", no_fast_path)
    monkeypatch.setenv("RANKFAST_BACKEND", "reference")
    got = rankfast.score(model, users, history=history, lengths=lengths, memory_budget=3000)
    expected = reference_scores(model, users, torch.arange(NUM_ITEMS), history, lengths)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    ids, _ = rankfast.score(model, users, k=2, history=history, lengths=lengths)
    assert torch.equal(ids, expected.topk(2).indices)

    monkeypatch.setenv("RANKFAST_BACKEND", "auto")
    with pytest.raises(AssertionError, match="factorized"):
        rankfast.score(model, users, history=history, lengths=lengths)
    monkeypatch.setenv("RANKFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="RANKFAST_BACKEND"):
        rankfast.score(model, users, history=history, lengths=lengths)


def test_restores_training_mode_and_runs_without_autograd():
    model = make_model("neumf").train()
    model.branch.eval()  # a mixed state must come back as it was
    got = rankfast.score(model, [0, 1])
    assert model.training and not model.branch.training and model.user_repr.training
    assert not got.requires_grad
    model.eval()
    torch.testing.assert_close(got, rankfast.score(model, [0, 1]), rtol=0, atol=0)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_concurrent_calls_on_worker_threads(three_threads):
    model = make_model("din")
    users = torch.arange(NUM_USERS)
    history, lengths = random_history(NUM_USERS, MAX_LEN)
    expected = reference_scores(model, users, torch.arange(NUM_ITEMS), history, lengths)
    results = [None] * 4

    def call(i):
        results[i] = rankfast.score(model, users, history=history, lengths=lengths, memory_budget=20_000)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == 3
    for got in results:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_worker_error_propagates_and_threads_are_restored(three_threads, monkeypatch):
    def broken(self, rows, state):
        raise RuntimeError("tile failed")

    monkeypatch.setattr(factorized.MLPScorer, "pairs", broken)
    with pytest.raises(RuntimeError, match="tile failed"):
        rankfast.score(make_model("mlp"), [0, 1])
    assert torch.get_num_threads() == 3


def test_history_is_ignored_by_models_without_it():
    model = make_model("dot")
    history, lengths = random_history(2, MAX_LEN)
    torch.testing.assert_close(
        rankfast.score(model, [1, 2], history=history, lengths=lengths), rankfast.score(model, [1, 2])
    )


def test_empty_users_and_candidates():
    model = make_model("din")
    history, lengths = random_history(2, MAX_LEN)
    assert rankfast.score(model, [], history=torch.zeros(0, 3, dtype=torch.long), lengths=[]).shape == (0, NUM_ITEMS)
    assert rankfast.score(model, [0, 1], [], history=history, lengths=lengths).shape == (2, 0)
    ids, values = rankfast.score(model, [0, 1], [], k=2, history=history, lengths=lengths)
    assert ids.shape == values.shape == (2, 0)


@pytest.mark.parametrize("k", [NUM_ITEMS + 1, 10**12])
def test_k_is_clamped_to_the_candidates(k):
    """Results are [B, min(k, N)]: k = 10**12 on a small model is what k = N is (it allocated [B, k])."""
    model = make_model("mlp")
    users = torch.tensor([3, 0, 6])
    exclude = [[4, 17], [], list(range(NUM_ITEMS))]
    for items, n in ((None, NUM_ITEMS), (torch.tensor([5, 9, 2]), 3), (torch.randint(0, NUM_ITEMS, (3, 4)), 4)):
        ids, values = rankfast.score(model, users, items, k=k, exclude=exclude)
        assert ids.shape == values.shape == (3, n)
        want_ids, want_values = rankfast.score(model, users, items, k=n, exclude=exclude)
        assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
        assert (ids[2] == -1).all()  # every candidate excluded: padding, n wide


def _bad(**overrides):
    args = dict(
        model=make_model("din"),
        users=[0, 1],
        items=None,
        history=torch.tensor([[3, 4, -1], [5, -1, -1]]),
        lengths=[2, 1],
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(model=torch.nn.Linear(2, 1)), TypeError, "model"),
        (_bad(users=[0, NUM_USERS]), ValueError, "users"),
        (_bad(users=[-1, 0]), ValueError, "users"),
        (_bad(users=[0.0, 1.0]), TypeError, "users"),
        (_bad(users=torch.tensor([True, False])), TypeError, "users"),
        (_bad(users=[[0, 1]]), ValueError, "users"),
        (_bad(users=3), TypeError, "users"),
        (_bad(users=torch.tensor(3)), ValueError, "users"),
        (_bad(users="abc"), TypeError, "users"),
        (_bad(items=[0, NUM_ITEMS]), ValueError, "items"),
        (_bad(items=torch.zeros(3, 4, dtype=torch.long)), ValueError, "items"),
        (_bad(items=torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "items"),
        (_bad(items=np.array([0.5])), TypeError, "items"),
        (_bad(k=-1), ValueError, "k"),
        (_bad(k=2.0), TypeError, "k"),
        (_bad(exclude=[[1], [2]]), ValueError, "exclude"),
        (_bad(k=2, exclude=[[1]]), ValueError, "exclude"),
        (_bad(k=2, exclude=[[NUM_ITEMS], []]), ValueError, "exclude"),
        (_bad(lengths=None), ValueError, "lengths"),
        (_bad(history=None), ValueError, "history"),
        (_bad(history=None, lengths=None), ValueError, "history"),
        (_bad(lengths=[4, 1]), ValueError, "lengths"),
        (_bad(lengths=[-1, 1]), ValueError, "lengths"),
        (_bad(lengths=[1, 1, 1]), ValueError, "lengths"),
        (_bad(lengths=[1.0, 1.0]), TypeError, "lengths"),
        (_bad(history=torch.tensor([[3, 4, 1]])), ValueError, "history"),
        (_bad(history=torch.tensor([3, 4])), ValueError, "history"),
        (_bad(history=torch.tensor([[3, NUM_ITEMS, -1], [5, -1, -1]])), ValueError, "history"),
        (_bad(history=torch.ones(2, 3)), TypeError, "history"),
        (_bad(memory_budget=0), ValueError, "memory_budget"),
        (_bad(memory_budget="1GB"), TypeError, "memory_budget"),
        (_bad(model=make_model("mlp"), lengths=[5, 0]), ValueError, "lengths"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    args = dict(args)
    model, users = args.pop("model"), args.pop("users")
    with pytest.raises(error, match=match):
        rankfast.score(model, users, **args)


def test_save_load_gives_identical_scores(tmp_path):
    model = make_model("din-features")
    history, lengths = random_history(4, MAX_LEN)
    args = dict(k=5, exclude=[[1], [], [2], []], history=history, lengths=lengths)
    before = rankfast.score(model, [0, 1, 2, 3], **args)
    model.save(tmp_path)
    after = rankfast.score(rankfast.models.load_model(tmp_path), [0, 1, 2, 3], **args)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
