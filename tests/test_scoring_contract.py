"""The scoring contract, once for every backend: each backend scores every model it covers as
the model's own forward does (the float64 oracle), with the same top-K rules; a backend that is
forced on a model it does not cover refuses by name; and ``auto`` falls back to the reference
scorer, so a new RankingModel is always scorable.

The fused backend runs the Triton kernels under TRITON_INTERPRET on a CPU (tests/conftest.py),
on float32 models (float64 models are not its business); the eager backends on float64 ones.
"""

from dataclasses import dataclass

import pytest
import torch

import rankfast
from rankfast.models import RankingModel
from rankfast.models.base import ModelConfig
from rankfast.scoring import BACKEND_ENV, Footprint, Scorer, select_scorer
from rankfast.scoring.backends import factorized, fused, reference
from rankfast.scoring.registry import backend_scorer

from helpers import CASES, NUM_ITEMS, NUM_USERS, assert_rankings_match, make_model, random_history, reference_scores

BACKENDS = {"reference": reference, "factorized": factorized, "fused": fused}
#: Largest relative error against the float64 oracle (docs/design.md's tolerances).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
MAX_LEN = 6


def _request(model):
    users = torch.tensor([3, 0, 6, 6, 1])
    history, lengths = random_history(len(users), MAX_LEN) if model.uses_history else (None, None)
    gen = torch.Generator().manual_seed(4)
    candidates = {
        "all": None,
        "shared-with-repeats": torch.tensor([4, 17, 4, 30, 0, 9, 17, 22, 1, 5, 13]),
        "per-user": torch.randint(0, NUM_ITEMS, (len(users), 9), generator=gen),
    }
    return users, history, lengths, candidates


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_backend_scores_what_the_model_forward_scores(backend, name, monkeypatch):
    dtype = torch.float32 if backend == "fused" else torch.float64
    model = make_model(name, dtype=dtype)
    monkeypatch.setenv(BACKEND_ENV, backend)
    users, history, lengths, candidates = _request(model)
    covering = backend_scorer(backend, model)  # the backend's scorer_for, less the registry's exclusions
    if covering is None:
        with pytest.raises(ValueError, match=f"{BACKEND_ENV}={backend}: the {backend} backend does not cover"):
            rankfast.score(model, users, history=history, lengths=lengths)
        return
    scorer = select_scorer(model, torch.device("cpu"))
    assert Scorer in scorer.__mro__ and scorer is covering  # declares the contract
    assert isinstance(scorer.footprint(model, MAX_LEN), Footprint)
    exclude = [[4, 17, 30], [], list(range(NUM_ITEMS)), [2, 2, 9], [5]]
    for kind, items in candidates.items():
        cand = torch.arange(NUM_ITEMS) if items is None else items
        want = reference_scores(model, users, cand, history, lengths)
        for budget in (rankfast.scoring.DEFAULT_MEMORY_BUDGET, 3000):  # one block; many blocks, chunks and tiles
            got = rankfast.score(model, users, items, history=history, lengths=lengths, memory_budget=budget)
            assert got.dtype == dtype and got.shape == want.shape, kind
            assert float((got.double() - want).norm() / want.norm()) < TOLERANCE[dtype], (kind, budget)
            ids, values = rankfast.score(
                model, users, items, k=4, exclude=exclude, history=history, lengths=lengths, memory_budget=budget
            )
            for row in range(len(users)):
                allowed = [
                    j for j in range(cand.shape[-1]) if int(cand.expand(len(users), -1)[row, j]) not in exclude[row]
                ]
                order = sorted(allowed, key=lambda j: -float(want[row, j]))[:4]
                want_ids = [int(cand.expand(len(users), -1)[row, j]) for j in order]
                n = len(want_ids)
                assert (ids[row, n:] == -1).all() and torch.isneginf(values[row, n:]).all(), (kind, row)
                assert_rankings_match(
                    ids[row, :n].tolist(),
                    values[row, :n].double().numpy(),
                    want_ids,
                    [float(want[row, j]) for j in order],
                    rtol=TOLERANCE[dtype],
                    atol=1e-6,
                )


@dataclass
class _BilinearConfig(ModelConfig):
    pass


class _ContractBilinear(RankingModel):
    """A model no backend knows: ``<E_u W, E_i>``."""

    config_class = _BilinearConfig

    def __init__(self, config):
        super().__init__(config, config.dim)
        self.mix = torch.nn.Parameter(torch.randn(config.dim, config.dim))

    def forward(self, users, items, history=None, lengths=None):
        return ((self.user_repr(users) @ self.mix) * self.item_repr(items)).sum(-1)


def test_a_model_no_backend_knows_is_scored_by_its_own_forward(monkeypatch):
    torch.manual_seed(0)
    model = _ContractBilinear(_BilinearConfig(NUM_USERS, NUM_ITEMS, 5)).double()
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert select_scorer(model, torch.device("cpu")) is reference.ReferenceScorer
    users = torch.tensor([0, 2, 5])
    got = rankfast.score(model, users, memory_budget=2000)
    torch.testing.assert_close(got, reference_scores(model, users, torch.arange(NUM_ITEMS)), rtol=1e-12, atol=1e-12)
    for forced in ("factorized", "fused"):
        monkeypatch.setenv(BACKEND_ENV, forced)
        with pytest.raises(ValueError, match=f"{BACKEND_ENV}={forced}"):
            rankfast.score(model, users)
