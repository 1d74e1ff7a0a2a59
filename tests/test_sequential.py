"""SASRec: the reference forward against a transformer written out by hand, its history
handling, next-item windows, the NextItem training step against per-event forwards, and
training end to end."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankfast.data import Interactions, event_histories, leave_last_out, sequence_windows
from rankfast.evaluate import evaluate
from rankfast.models import SASRec, SASRecConfig
from rankfast.train import TrainConfig, fit
from rankfast.train.catalogue import sequence_scores

from helpers import NUM_ITEMS, NUM_USERS, QUIET, make_model, random_history


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _by_hand(model, items):
    """The user vector of one history ``items`` (a list of ids, oldest first), written out:
    embeddings plus positions, then per block pre-norm causal attention head by head and
    the feed-forward network, then the final norm at the last item; and the last block's
    attention weights at the last item, averaged over the heads (``[n]``, n the items read)."""
    cfg = model.config
    items = items[-cfg.max_len :]
    n = len(items)
    if n == 0:
        return torch.zeros(cfg.dim, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    x = torch.stack([model.item_repr(torch.tensor(i)) + model.positions.weight[t] for t, i in enumerate(items)])
    dh = cfg.dim // cfg.num_heads
    last = None
    for block in model.blocks:
        h = _layer_norm(x, block.attn_norm)
        qkv = h @ block.qkv.weight.T + block.qkv.bias
        q, k, v = qkv[:, : cfg.dim], qkv[:, cfg.dim : 2 * cfg.dim], qkv[:, 2 * cfg.dim :]
        heads = []
        for head in range(cfg.num_heads):
            cols = slice(head * dh, (head + 1) * dh)
            rows = []
            for t in range(n):  # position t attends to positions 0..t
                logits = torch.stack([q[t, cols] @ k[s, cols] / math.sqrt(dh) for s in range(t + 1)])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                rows.append(sum(w * v[s, cols] for s, w in enumerate(weights)))
                if t == n - 1:  # the last block's overwrites the earlier blocks'
                    last = last + weights / cfg.num_heads if head else weights / cfg.num_heads
            heads.append(torch.stack(rows))
        x = x + torch.cat(heads, dim=1) @ block.out.weight.T + block.out.bias
        first, second = block.ff.linears
        hidden = F.gelu(_layer_norm(x, block.ff_norm) @ first.weight.T + first.bias)
        x = x + hidden @ second.weight.T + second.bias
    return _layer_norm(x[-1], model.norm), last


@pytest.mark.parametrize("name", ["sasrec", "sasrec-features"])
def test_forward_matches_a_transformer_written_by_hand(name):
    model = make_model(name).eval()
    history, lengths = random_history(NUM_USERS, 6)  # longer than sasrec's max_len=4, some empty
    users, items = torch.arange(NUM_USERS), torch.randint(0, NUM_ITEMS, (NUM_USERS,))
    got = model(users, items, history, lengths)
    for b in range(NUM_USERS):
        u, _ = _by_hand(model, history[b, : lengths[b]].tolist())
        expected = u @ model.item_repr(items[b]) + model.item_bias[items[b]]
        torch.testing.assert_close(got[b], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sasrec", "sasrec-features"])
def test_history_weights_are_the_last_blocks_attention_at_the_last_item(name):
    """Against the transformer written by hand: each history slot's weight is the last block's
    attention from the last item read, averaged over the heads; 0 at padding and at items
    older than the last max_len; the same for every candidate."""
    model = make_model(name).eval()
    history, lengths = random_history(NUM_USERS, 6)  # longer than sasrec's max_len=4, some empty
    users, items = torch.arange(NUM_USERS), torch.randint(0, NUM_ITEMS, (NUM_USERS,))
    got = model.history_weights(users, items, history, lengths)
    assert got.shape == history.shape
    for b in range(NUM_USERS):
        n = int(lengths[b])
        _, last = _by_hand(model, history[b, :n].tolist())
        want = torch.zeros(history.shape[1], dtype=torch.float64)
        want[n - len(last) : n] = last
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.history_weights(users, items.flip(0), history, lengths), got)
    rows = torch.tensor([2, 2, 5, 2])  # a history repeated per candidate, as explanations ask: encoded once
    torch.testing.assert_close(model.history_weights(users[rows], items[rows], history[rows], lengths[rows]), got[rows])
    assert torch.equal(model.history_weights(users, items, history[:, :0], lengths * 0), history[:, :0].double())


def test_history_handling():
    model = make_model("sasrec").eval()  # max_len 4
    users, items = torch.zeros(4, dtype=torch.long), torch.tensor([3, 3, 3, 3])
    history = torch.tensor([[5, 6, 7, 8, 9, 10], [7, 8, 9, 10, -1, -1], [7, 8, 9, 10, 0, 0], [1, 1, 1, 1, 1, 1]])
    lengths = torch.tensor([6, 4, 4, 0])
    scores = model(users, items, history, lengths)
    # The last max_len valid items are read; padding values are ignored.
    torch.testing.assert_close(scores[0], scores[1])
    torch.testing.assert_close(scores[1], scores[2])
    # An empty history scores the item bias alone.
    torch.testing.assert_close(scores[3], model.item_bias[3])
    assert torch.equal(model.user_vectors(history[:, :0], torch.zeros(4, dtype=torch.long)), torch.zeros(4, 6).double())
    with pytest.raises(ValueError, match="history"):
        model(users, items)
    with pytest.raises(ValueError, match="history"):
        model(users, items, history[0], lengths)
    with pytest.raises(ValueError, match="max_len=4"):
        model.encode(history, lengths)


def test_encode_is_causal():
    model = make_model("sasrec").eval()
    history = torch.tensor([[2, 4, 6, 8], [2, 4, 9, 9]])
    out = model.encode(history, torch.tensor([4, 4]))
    torch.testing.assert_close(out[0, :2], out[1, :2])
    assert not torch.allclose(out[0, 2:], out[1, 2:])


def test_config_checks():
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(num_users=2, num_items=3, dim=6, num_heads=4)
    with pytest.raises(ValueError, match="user_feature_dim"):
        SASRecConfig(num_users=2, num_items=3, dim=6, user_feature_dim=2)
    with pytest.raises(ValueError, match="max_len"):
        SASRecConfig(num_users=2, num_items=3, dim=6, max_len=0)
    with pytest.raises(ValueError, match="user_features"):
        SASRec(SASRecConfig(num_users=2, num_items=3, dim=6), user_features=torch.zeros(2, 2))
    assert not hasattr(SASRec(SASRecConfig(num_users=2, num_items=3, dim=6)), "user_repr")


# --- next-item windows and training ------------------------------------------------------------


def _sequences(lengths, num_items=20, seed=0):
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u, n in enumerate(lengths):
        users += [u] * n
        items += rng.integers(0, num_items, n).tolist()
        stamps += rng.permutation(n).tolist()  # time order differs from row order
    return Interactions.from_raw(users, items, None, stamps)


@pytest.mark.parametrize("max_len", [1, 2, 4, 5])
def test_sequence_windows_give_each_event_its_history_once(max_len):
    data = _sequences([1, 3, 7, 12, 2, 0])
    windows, lengths, targets, users, events = sequence_windows(data, max_len)
    history, history_len = event_histories(data, 100)
    got = events[events >= 0]
    # Every interaction with a history is a target exactly once; a user's first is none.
    assert sorted(got.tolist()) == np.flatnonzero(history_len > 0).tolist()
    stride = max(1, max_len // 2)
    for w, p in zip(*np.nonzero(events >= 0), strict=True):
        event = events[w, p]
        assert targets[w, p] == data.items[event] and users[w] == data.users[event]
        context = windows[w, : p + 1]
        full = history[event, : history_len[event]]
        # The window holds the event's last items before it: all of them, or more than max_len - stride.
        assert np.array_equal(full[len(full) - len(context) :], context)
        assert len(context) == len(full) or len(context) > max_len - stride
        assert p < lengths[w] <= max_len


def _next_item_loss_by_events(model, data, max_len, negatives=None):
    """The full-softmax loss of every window target, each scored by the model's own forward on
    its history against every item."""
    windows, lengths, targets, _, _ = sequence_windows(data, max_len)
    losses = []
    for w, p in zip(*np.nonzero(targets >= 0), strict=True):
        history = torch.from_numpy(windows[w, None, : p + 1]).expand(data.num_items, -1)
        lengths_ = torch.full((data.num_items,), p + 1)
        scores = model(torch.zeros(data.num_items, dtype=torch.long), torch.arange(data.num_items), history, lengths_)
        losses.append(torch.logsumexp(scores, 0) - scores[targets[w, p]])
    return torch.stack(losses).mean()


def test_next_item_step_is_the_mean_of_per_event_losses():
    """NextItem's loss of one micro-batch holding every window equals the per-event full softmax."""
    from rankfast.train.batching import Examples, NextItem
    from rankfast.train.distributed import DistContext

    data = _sequences([3, 9, 1, 6], num_items=11)
    config = SASRecConfig(num_users=4, num_items=data.num_items, dim=6, max_len=4, num_heads=2, dropout=0.0)
    model = SASRec(config).double()
    config = TrainConfig(loss="softmax", negatives="all", batch_size=10_000, max_history=50)
    strategy = NextItem(
        model, data, Examples(data, 50, False), config, DistContext(), torch.device("cpu"), backend=None
    )
    [(idx, extra)] = strategy.micro_batches(0)
    got = strategy.loss(strategy.module(), idx, extra)  # the strategy takes the loss in float32
    torch.testing.assert_close(got.double(), _next_item_loss_by_events(model, data, 4), rtol=1e-6, atol=1e-6)


def test_sequence_scores_of_sampled_candidates_match_the_catalogue():
    model = make_model("sasrec").eval()
    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    lengths = torch.tensor([4, 2])
    select = torch.tensor([[False, True, False, True], [True, True, False, False]])
    full = sequence_scores(model, windows, lengths, select)
    candidates = torch.tensor([[3, 0, 9], [30, 30, 1], [2, 4, 6], [7, 8, 9]])
    torch.testing.assert_close(sequence_scores(model, windows, lengths, select, candidates), full.gather(1, candidates))


def _cycles(n_users=60, n_items=24, length=14, seed=0):
    """Each user walks a cycle of the items, from a random start: the next item is the last plus one."""
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(n_users):
        start = rng.integers(n_items)
        users += [u] * length
        items += [(start + t) % n_items for t in range(length)]
        stamps += list(range(length))
    return Interactions.from_raw(users, items, None, stamps)


@pytest.mark.parametrize("negatives", ["all", "uniform"])
def test_sasrec_learns_what_comes_next(negatives):
    torch.manual_seed(0)
    data = _cycles()
    train, test = leave_last_out(data)
    model = SASRec(SASRecConfig(num_users=data.num_users, num_items=data.num_items, dim=16, max_len=6, dropout=0.0))
    config = TrainConfig(
        epochs=25, loss="softmax", negatives=negatives, num_negatives=8, lr=0.01, batch_size=128, max_history=6, **QUIET
    )
    history = fit(model, train, config)
    assert history[-1]["loss"] < history[0]["loss"]
    metrics = evaluate(model, train, test, ks=(1,), max_history=6, progress=False)
    assert metrics["hr@1"] > 0.8  # popularity is flat here: about 1/24 by chance


def test_fit_refuses_what_sasrec_cannot_train():
    data = _cycles(n_users=4, length=4)
    model = SASRec(SASRecConfig(num_users=4, num_items=data.num_items, dim=4, max_len=3))
    with pytest.raises(ValueError, match="partition"):
        fit(model, data, TrainConfig(loss="softmax", negatives="partition", **QUIET))
    with pytest.raises(ValueError, match="mse"):
        fit(model, data, TrainConfig(loss="mse", **QUIET))
