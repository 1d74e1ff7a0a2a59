"""rankfast.ensemble.Blend: the weighted sum of its models' own scores, through evaluate's calls."""

import numpy as np
import pytest
import torch

from rankfast.data import Interactions, user_histories
from rankfast.ensemble import Blend
from rankfast.evaluate import evaluate

from helpers import NUM_ITEMS, NUM_USERS, make_model, reference_scores


def _data(num_users=NUM_USERS):
    """Every user and item present (so ids are the identity), in a random time order."""
    rng = np.random.default_rng(0)
    users = np.concatenate([np.arange(NUM_ITEMS) % num_users, rng.integers(0, num_users, 40)])
    items = np.concatenate([np.arange(NUM_ITEMS), rng.integers(0, NUM_ITEMS, 40)])
    return Interactions.from_raw(users, items, None, rng.permutation(len(users)))


def test_blend_scores_the_weighted_sum_of_its_models():
    data = _data()
    dot, sasrec = make_model("dot"), make_model("sasrec")
    blend = Blend([dot, sasrec], [1.0, 0.5], data, max_history=3)
    users = torch.tensor([4, 0, 6])
    history, lengths = (torch.from_numpy(a)[users] for a in user_histories(data, 3))
    items = torch.arange(NUM_ITEMS)
    want = reference_scores(dot, users, items) + 0.5 * reference_scores(sasrec, users, items, history, lengths)
    torch.testing.assert_close(blend.score(users).double(), want, rtol=1e-5, atol=1e-5)
    pairs = blend(users, torch.tensor([3, 30, 0]))
    torch.testing.assert_close(pairs.double(), want[[0, 1, 2], [3, 30, 0]], rtol=1e-5, atol=1e-5)
    ids, values = blend.recommend(users, 4, exclude=[[int(want[0].argmax())], [], []])
    assert int(want[0].argmax()) not in ids[0].tolist()
    assert ids[1].tolist() == want[1].argsort(descending=True)[:4].tolist()
    metrics = evaluate(blend, data, data, ks=(5,), progress=False)  # every item excluded: no hits
    assert metrics["recall@5"] == 0.0


def test_blend_checks_its_arguments():
    data = _data()
    dot = make_model("dot")
    with pytest.raises(ValueError, match="weights: expected one weight per model"):
        Blend([dot], [1.0, 2.0], data)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected a finite number"):
        Blend([dot], [np.nan], data)
    with pytest.raises(TypeError, match=r"models\[1\]"):
        Blend([dot, "sasrec"], [1.0, 1.0], data)
    with pytest.raises(ValueError, match=r"models\[0\]: built for"):
        Blend([dot], [1.0], _data(NUM_USERS + 1))
    with pytest.raises(ValueError, match="users: id"):
        Blend([dot], [1.0], data).score([NUM_USERS])
