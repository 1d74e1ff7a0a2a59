"""rankfast.Ranker: model directories, scoring by raw ids against a float64 reference,
micro-batching, threads, cold start, corrupted directories, torch.export."""

import builtins
import hashlib
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

import rankfast._io as io_module
import rankfast.model_dir as model_dir_module
import rankfast.ranker as ranker_module
from rankfast import Ranker, TrainConfig, fit
from rankfast.data import Interactions, synthetic_interactions, user_histories
from rankfast.models import (
    AttentionConfig,
    AttentionModel,
    DotConfig,
    DotModel,
    MLPConfig,
    MLPModel,
    SASRec,
    SASRecConfig,
    load_model,
)
from rankfast.ranker import Limits, ModelDirError, save_model_dir

from helpers import assert_rankings_match

NUM_USERS, NUM_ITEMS = 40, 30


@pytest.fixture(scope="module")
def train():
    """Synthetic interactions under non-contiguous int user ids and string item ids."""
    data = synthetic_interactions(NUM_USERS, NUM_ITEMS, per_user=6, seed=3)
    raw_items = np.array([f"i{n:03d}" for n in range(NUM_ITEMS)])
    return Interactions.from_raw(100 + 7 * data.users, raw_items[data.items], timestamps=data.timestamps)


@pytest.fixture(scope="module")
def int_train():
    """The same interactions under non-contiguous int user and item ids."""
    data = synthetic_interactions(NUM_USERS, NUM_ITEMS, per_user=6, seed=3)
    return Interactions.from_raw(100 + 7 * data.users, 1000 + 3 * data.items, timestamps=data.timestamps)


def attention(train, seed=3):
    torch.manual_seed(seed)
    return AttentionModel(
        AttentionConfig(num_users=train.num_users, num_items=train.num_items, dim=8, hidden=(8,), unit_hidden=(6,))
    )


def mlp(train):
    torch.manual_seed(0)
    return MLPModel(MLPConfig(num_users=train.num_users, num_items=train.num_items, dim=8, hidden=(12,)))


@pytest.fixture(scope="module")
def saved(train, tmp_path_factory):
    """``(model, directory)`` of an MLP model saved with ``train``."""
    model = mlp(train)
    return model, save_model_dir(tmp_path_factory.mktemp("ranker") / "model", model, train)


def reference_top_k(model, train, users, k, exclude_seen=True, candidates=None, history=None, lengths=None):
    """Top-k raw item ids and scores from the model's own forward in float64 over every pair."""
    model = model.double()
    try:
        rows = train.user_ids.index(users)
        cand = np.arange(train.num_items) if candidates is None else train.item_ids.index(candidates)
        pairs_u = torch.from_numpy(np.repeat(rows, len(cand)))
        pairs_i = torch.from_numpy(np.tile(cand, len(rows)))
        extra = ()
        if history is not None:
            extra = (history[pairs_u], lengths[pairs_u])
        with torch.no_grad():
            scores = model(pairs_u, pairs_i, *extra).view(len(rows), len(cand))
    finally:
        model.float()
    if exclude_seen:
        indptr, items = train.user_items()
        for j, u in enumerate(rows):
            scores[j, np.isin(cand, items[indptr[u] : indptr[u + 1]])] = -np.inf
    values, pos = torch.sort(scores, dim=1, descending=True, stable=True)
    out = []
    for j in range(len(rows)):
        keep = torch.isfinite(values[j, :k])
        out.append((train.item_ids.to_raw(cand[pos[j, :k][keep].numpy()]).tolist(), values[j, :k][keep].numpy()))
    return out


def check(results, expected, users):
    assert [r["user"] for r in results] == list(users)
    for row, (items, scores) in zip(results, expected, strict=True):
        assert_rankings_match(row["items"], row["scores"], items, scores)


def test_directory_layout_and_score_against_reference(saved, train):
    model, directory = saved
    assert sorted(os.listdir(directory)) == [
        "config.json",
        "mappings.json",
        "model.safetensors",
        "ranker.json",
        "users.safetensors",
    ]
    ranker = Ranker.load(directory)
    users = [100, 107, 100 + 7 * 39]
    check(ranker.score(users, k=5), reference_top_k(model, train, users, 5), users)


def test_candidates_include_seen_and_short_rows(saved, train):
    model, directory = saved
    ranker = Ranker.load(directory)
    candidates = ["i003", "i010", "i000", "i029"]
    users = [114, 121]
    got = ranker.score(users, candidates=candidates, k=10, exclude_seen=False)
    check(got, reference_top_k(model, train, users, 10, exclude_seen=False, candidates=candidates), users)
    assert all(len(r["items"]) == 4 for r in got)  # k > candidates: only what exists
    seen = ranker.score(users, candidates=candidates, k=10)
    check(seen, reference_top_k(model, train, users, 10, candidates=candidates), users)


def test_score_many_batches_requests_into_one_call(saved, monkeypatch):
    ranker = Ranker.load(saved[1])
    requests = [
        {"users": [100], "k": 7},
        {"users": [107, 114], "k": 7},
        {"users": [121], "k": 2, "exclude_seen": False},
        {"users": [128], "k": 3},
    ]
    expected = [ranker.score(**r) for r in requests]
    calls = []
    real = ranker_module.score
    monkeypatch.setattr(ranker_module, "score", lambda *a, **kw: calls.append(kw["k"]) or real(*a, **kw))
    got = ranker.score_many(requests)
    assert sorted(calls) == [2, 3, 7]  # the two requests with the same k and exclude_seen share one call
    for rows, want in zip(got, expected, strict=True):  # a bigger batch may round the last bits differently
        assert [r["user"] for r in rows] == [r["user"] for r in want]
        for row, one in zip(rows, want, strict=True):
            assert_rankings_match(row["items"], row["scores"], one["items"], one["scores"])


def test_score_many_scores_each_request_at_its_own_k(saved, monkeypatch):
    """One huge k among many small ones costs only itself: it was the whole group's k (all
    64 users at k=10**12, a MemoryError for every request)."""
    ranker = Ranker.load(saved[1])
    good = [{"users": [100 + 7 * (u % NUM_USERS)], "k": 10} for u in range(63)]
    calls = []
    real = ranker_module.score
    monkeypatch.setattr(
        ranker_module,
        "score",
        lambda m, users, *a, **kw: calls.append((len(users), kw["k"])) or real(m, users, *a, **kw),
    )
    got = ranker.score_many([*good, {"users": [121], "k": 10**12}])
    assert sorted(calls) == [(1, NUM_ITEMS), (63, 10)]  # each at its own k, clamped to the 30 items
    assert all(len(rows[0]["items"]) == 10 for rows in got[:63])
    assert got[63] == ranker.score([121], k=NUM_ITEMS)


def test_score_many_checks_every_request_first_and_can_return_errors(saved, monkeypatch):
    ranker = Ranker.load(saved[1])
    good = [{"users": [100], "k": 3}, {"users": [107, 114], "k": 3, "exclude_seen": False}]
    bad = [
        ({"users": [999]}, KeyError, "users: unknown user id 999"),
        ({"users": [100], "k": 0}, ValueError, "k: expected a positive int, got 0"),
        ({"users": [None]}, TypeError, r"users\[0\]: expected a raw id"),
        ({"users": [100], "exclude_seen": "no"}, TypeError, "exclude_seen: expected true or false"),
        ({"user": [100]}, TypeError, "request: unknown fields"),
    ]
    calls = []
    real = ranker_module.score
    monkeypatch.setattr(ranker_module, "score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for request, error, match in bad:
        with pytest.raises(error, match=match):
            ranker.score_many([*good, request])
    assert calls == []  # checked before anything was scored
    got = ranker.score_many([good[0], *(r for r, _, _ in bad), good[1]], return_errors=True)
    assert got[0] == ranker.score(**good[0]) and got[-1] == ranker.score(**good[1])
    for answer, (_, error, match) in zip(got[1:-1], bad, strict=True):
        assert isinstance(answer, error)
        with pytest.raises(error, match=match):
            raise answer


def test_score_many_isolates_a_request_whose_scoring_fails(saved, monkeypatch):
    """A request that fails while scored (here a MemoryError whenever user 121 is in the batch)
    fails alone with return_errors=True; without it the error propagates."""
    ranker = Ranker.load(saved[1])
    requests = [{"users": [100], "k": 4}, {"users": [121, 107], "k": 4}, {"users": [114], "k": 4}]
    expected = [ranker.score(**r) for r in requests]
    real = ranker_module.score
    row_121 = int(ranker.user_ids.index([121])[0])

    def failing(model, users, *args, **kwargs):
        if row_121 in users.tolist():
            raise MemoryError("cannot allocate")
        return real(model, users, *args, **kwargs)

    monkeypatch.setattr(ranker_module, "score", failing)
    with pytest.raises(MemoryError):
        ranker.score_many(requests)
    got = ranker.score_many(requests, return_errors=True)
    assert isinstance(got[1], MemoryError)
    for n in (0, 2):
        for row, want in zip(got[n], expected[n], strict=True):
            assert_rankings_match(row["items"], row["scores"], want["items"], want["scores"])


def test_hostile_arguments_get_clear_errors(saved):
    """Ids of the wrong kind were an AttributeError from deep inside (None, 2**70), or scored
    as another id (True as user 1); a repeated candidate came back several times."""
    ranker = Ranker.load(saved[1])
    for users, error, match in (
        ([None], TypeError, r"users\[0\]: expected a raw id \(an int or a string\), got None"),
        ([100, True], TypeError, r"users\[1\]: expected a raw id"),
        ([[100]], TypeError, r"users\[0\]: expected a raw id"),
        ([2**70], KeyError, "users: unknown user id 1180591620717411303424"),
        ([100, "i001"], TypeError, "users: ids must be all numbers or all strings"),
        ("100", TypeError, "users: expected a sequence of ids, got str"),
        ({100: 1}, TypeError, "users: expected a sequence of ids, got dict"),
    ):
        with pytest.raises(error, match=match):
            ranker.score(users)
    with pytest.raises(TypeError, match="exclude_seen: expected true or false, got 'no'"):
        ranker.score([100], exclude_seen="no")
    with pytest.raises(KeyError, match="candidates: unknown raw id 'i999'"):
        ranker.score([100], candidates=["i001", "i999"])
    with pytest.raises(KeyError, match="candidates: unknown raw id 7"):
        ranker.score([100], candidates=[7])  # a number among string ids
    with pytest.raises(ValueError, match="k: expected a positive int, got 'xxxxx.*\\.\\.\\.$"):
        ranker.score([100], k="x" * 1000)  # what a client sent is echoed cut short
    (row,) = ranker.score([100], candidates=["i003", "i003", "i010", "i003"], k=10, exclude_seen=False)
    assert sorted(row["items"]) == ["i003", "i010"]
    (row,) = ranker.score([100], k=10**12, exclude_seen=False)
    assert sorted(row["items"]) == ranker.item_ids.raw.tolist()


def test_limits(saved):
    ranker = Ranker.load(saved[1], limits=Limits(max_k=5, max_users=2, max_candidates=3))
    assert len(ranker.score([100, 107], candidates=["i001", "i002", "i003"], k=5, exclude_seen=False)[0]["items"]) == 3
    for kwargs, match in (
        ({"users": [100], "k": 6}, "k: 6 is more than this Ranker's limit max_k=5"),
        ({"users": [100, 107, 114], "k": 2}, "users: 3 ids, more than this Ranker's limit max_users=2"),
        (
            {"users": [100], "candidates": ["i001", "i002", "i003", "i004"], "k": 2},
            "candidates: 4 ids, more than this Ranker's limit max_candidates=3",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            ranker.score(**kwargs)
    assert Ranker.load(saved[1]).limits == Limits()  # none by default


def test_threads_match_serial_and_restore_thread_count(saved):
    ranker = Ranker.load(saved[1])
    requests = [([100 + 7 * ((3 * n + j) % NUM_USERS) for j in range(5)], 4 + n % 3) for n in range(8)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two scoring workers per call: the path that changes the thread count
    try:
        serial = [ranker.score(users, k=k) for users, k in requests]
        results, barrier = [None] * 8, threading.Barrier(8)

        def work(n):
            barrier.wait()
            for _ in range(3):
                results[n] = ranker.score(requests[n][0], k=requests[n][1])

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == serial
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_attention_model_uses_stored_histories(train, tmp_path):
    torch.manual_seed(1)
    config = AttentionConfig(num_users=train.num_users, num_items=train.num_items, dim=8, hidden=(8,), unit_hidden=(6,))
    model = AttentionModel(config)
    ranker = Ranker.load(save_model_dir(tmp_path / "att", model, train, max_history=4))
    history, lengths = (torch.from_numpy(a) for a in user_histories(train, 4))
    users = [100, 135]
    check(ranker.score(users, k=4), reference_top_k(model, train, users, 4, history=history, lengths=lengths), users)


def pooled_dot_model(train):
    """``(model, item features)``: a DotModel whose users are their training items' mean feature vector."""
    features = torch.randn(train.num_items, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    config = DotConfig(
        num_users=train.num_users, num_items=train.num_items, dim=5, user_feature_dim=6, item_feature_dim=6
    )
    indptr, items = train.user_items()
    user_vectors = torch.stack([features[items[indptr[u] : indptr[u + 1]]].mean(0) for u in range(train.num_users)])
    model = DotModel(config, user_features=user_vectors, item_features=features)
    with torch.no_grad():
        model.user_bias.normal_()
        model.item_bias.normal_()
    return model, features


def test_unknown_users_error_or_cold_start(train, tmp_path):
    model, features = pooled_dot_model(train)
    directory = save_model_dir(tmp_path / "cold", model, train)
    with pytest.raises(KeyError, match="unknown user id 5"):
        Ranker.load(directory).score([100, 5])

    ranker = Ranker.load(directory, cold_start=True)
    history = ["i004", "i011", "i002"]
    got = ranker.score([5, 107, 6], k=6, histories={5: history})
    # Reference in float64: the cold user is the mean of its history's vectors, no user bias.
    m = model.double()
    rows = train.item_ids.index(history)
    user = m.user_repr.projection(features.double()[rows].mean(0))
    scores = m.item_repr.all() @ user + m.item_bias + m.bias
    scores[rows] = -np.inf
    best = torch.sort(scores, descending=True)
    expected_items = train.item_ids.to_raw(best.indices[:6].numpy()).tolist()
    assert_rankings_match(got[0]["items"], got[0]["scores"], expected_items, best.values[:6].detach().numpy())
    empty = m.user_repr.projection(torch.zeros(6, dtype=torch.float64))  # no history: a zero vector
    assert got[2]["items"][0] == train.item_ids.to_raw([int(torch.argmax(m.item_repr.all() @ empty + m.item_bias))])[0]
    m.float()
    check(got[1:2], reference_top_k(model, train, [107], 6), [107])
    assert model.config.num_users == train.num_users  # the served model is untouched

    id_model = Ranker.load(save_model_dir(tmp_path / "ids", mlp(train), train), cold_start=True)
    with pytest.raises(ValueError, match="cannot score new users"):
        id_model.score([5])


def test_cold_start_history_ids_are_matched_exactly(train, int_train, tmp_path):
    """An unknown history id is an error, never cast into a known one ('i0049' is not 'i004')."""
    model, _ = pooled_dot_model(train)
    ranker = Ranker.load(save_model_dir(tmp_path / "cold", model, train), cold_start=True)
    for history in (["i0049"], ["i002", "i011x"], "i004"):
        with pytest.raises((KeyError, TypeError), match="histories"):
            ranker.score([5], histories={5: history})
    integer = Ranker.load(save_model_dir(tmp_path / "int", model, int_train), cold_start=True)
    with pytest.raises(KeyError, match="unknown raw id 1000.5"):
        integer.score([1], histories={1: [1000.5]})
    # Equal ids in another container or width score the same as the list of str.
    want = ranker.score([5], histories={5: ["i004", "i011"]})
    assert ranker.score([5], histories={5: np.array(["i004", "i011"], dtype="<U8")}) == want


def test_encoder_directory_is_copied_and_found(train, tmp_path):
    encoder = tmp_path / "encoder-src"
    (encoder / "sub").mkdir(parents=True)
    (encoder / "config.json").write_text('{"hidden": 8}')
    (encoder / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    ranker = Ranker.load(save_model_dir(tmp_path / "model", mlp(train), train, encoder=encoder))
    assert ranker.encoder_dir == os.path.join(ranker.directory, "encoder")
    for name in ("config.json", os.path.join("sub", "weights.bin")):
        assert (encoder / name).read_bytes() == open(os.path.join(ranker.encoder_dir, name), "rb").read()
    assert Ranker.load(save_model_dir(tmp_path / "plain", mlp(train), train)).encoder_dir is None


def test_fit_writes_the_same_model_directory(train, tmp_path):
    """fit(checkpoint_dir=...) writes checkpoint_dir/model through save_model_dir: an
    AttentionModel's directory loads, with its histories and seen items."""
    model = attention(train)
    config = TrainConfig(
        epochs=1, batch_size=64, num_negatives=2, max_history=4, progress=False, checkpoint_dir=str(tmp_path)
    )
    fit(model, train, config)
    directory = tmp_path / "model"
    assert sorted(os.listdir(directory)) == [
        "config.json",
        "mappings.json",
        "model.safetensors",
        "ranker.json",
        "users.safetensors",
    ]
    ranker = Ranker.load(directory)
    assert ranker.meta["max_history"] == 4
    history, lengths = (torch.from_numpy(a) for a in user_histories(train, 4))
    users = [100, 135, 100 + 7 * 39]
    check(
        ranker.score(users, k=5),
        reference_top_k(model.eval(), train, users, 5, history=history, lengths=lengths),
        users,
    )


def test_a_model_save_directory_is_not_a_model_directory(train, tmp_path):
    mlp(train).save(tmp_path / "plain")
    with pytest.raises(ModelDirError, match="ranker.json: missing"):
        Ranker.load(tmp_path / "plain")


def rewrite(directory, name, content: bytes):
    """Replaces a file of a model directory and its size and sha256 in ranker.json,
    as a writer of bad content would."""
    (directory / name).write_bytes(content)
    edit_meta(
        directory,
        files={
            **read_meta(directory)["files"],
            name: {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()},
        },
    )


def read_meta(directory) -> dict:
    return json.loads((directory / "ranker.json").read_text())


def edit_meta(directory, **changes):
    (directory / "ranker.json").write_text(json.dumps({**read_meta(directory), **changes}))


def half(directory, name) -> bytes:
    content = (directory / name).read_bytes()
    return content[: len(content) // 2]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(d / "model.safetensors"), "model.safetensors: missing"),
        (lambda d: os.remove(d / "mappings.json"), "mappings.json: missing"),
        (lambda d: os.remove(d / "users.safetensors"), "users.safetensors: missing"),
        (lambda d: os.remove(d / "ranker.json"), "ranker.json: missing"),
        (
            lambda d: rewrite(d, "model.safetensors", half(d, "model.safetensors")),
            "model.safetensors: not a readable safetensors",
        ),
        (lambda d: rewrite(d, "config.json", b"{not json"), "not a rankfast model config"),
        (lambda d: rewrite(d, "mappings.json", b'{"users": [1, 2], "items": ["a"]}'), "maps 2 users and 1 items"),
        (lambda d: rewrite(d, "users.safetensors", half(d, "users.safetensors")), "users.safetensors: not a readable"),
        (lambda d: (d / "ranker.json").write_text("[]"), "expected a JSON object"),
        (lambda d: edit_meta(d, format=999), "unknown format 999"),
        (lambda d: edit_meta(d, format=True), "unknown format True"),
        (lambda d: edit_meta(d, files=None), "files: expected the size and sha256"),
        (lambda d: edit_meta(d, encoder="/etc"), "encoder: expected a relative path inside the model directory"),
        (
            lambda d: edit_meta(d, encoder="encoder/../../etc"),
            "encoder: expected a relative path inside the model directory",
        ),
        (lambda d: edit_meta(d, max_history="abc"), "max_history: expected a positive int"),
    ],
)
def test_corrupted_directory_fails_clearly(saved, tmp_path, damage, message):
    directory = shutil.copytree(saved[1], tmp_path / "copy")
    damage(directory)
    with pytest.raises(ModelDirError, match=message):
        Ranker.load(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        Ranker.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def attention_saved(train, tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("attention") / "model", attention(train), train, max_history=4)


def _users_with(directory, **changes) -> bytes:
    from safetensors.torch import load_file, save

    tensors = {**load_file(directory / "users.safetensors"), **changes}
    return save({k: v for k, v in tensors.items() if v is not None})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: {"history": t["history"].clone().index_fill_(1, torch.tensor([0]), NUM_ITEMS)},
            "history: item ids out of range",
        ),
        (lambda t: {"lengths": t["lengths"].clone().fill_(5)}, r"lengths: expected values in \[0, 4\]"),
        (lambda t: {"lengths": t["lengths"].clone().fill_(-1)}, r"lengths: expected values in \[0, 4\]"),
        (lambda t: {"history": t["history"].float()}, "history: expected int64, got torch.float32"),
        (lambda t: {"seen_indptr": t["seen_indptr"].double()}, "seen_indptr: expected int64"),
        (lambda t: {"seen_items": t["seen_items"][None]}, "seen_items one dimension"),
        (lambda t: {"seen_items": t["seen_items"] + NUM_ITEMS}, "seen_items: item ids out of range"),
        (lambda t: {"seen_indptr": t["seen_indptr"].flip(0)}, "seen_indptr: not a row pointer"),
        (lambda t: {"history": None}, r"expected the tensors \['history', 'lengths', 'seen_indptr', 'seen_items'\]"),
    ],
)
def test_corrupted_users_file_fails_at_load(attention_saved, tmp_path, change, message):
    """Not in every later request, where it would look like the client's fault."""
    from safetensors.torch import load_file

    directory = shutil.copytree(attention_saved, tmp_path / "copy")
    rewrite(
        directory, "users.safetensors", _users_with(directory, **change(load_file(directory / "users.safetensors")))
    )
    with pytest.raises(ModelDirError, match=message):
        Ranker.load(directory)


def test_a_changed_file_is_detected(saved, train, tmp_path):
    """Flipped bytes, or a same-shaped weights file of another model: the size and sha256
    in ranker.json no longer match."""
    flipped = shutil.copytree(saved[1], tmp_path / "flipped")
    weights = bytearray((flipped / "model.safetensors").read_bytes())
    weights[-1] ^= 0x40
    (flipped / "model.safetensors").write_bytes(weights)
    swapped = shutil.copytree(saved[1], tmp_path / "swapped")
    torch.manual_seed(9)
    other = save_model_dir(tmp_path / "other", MLPModel(saved[0].config), train)
    shutil.copy(os.path.join(other, "model.safetensors"), swapped / "model.safetensors")
    for directory in (flipped, swapped):
        with pytest.raises(ModelDirError, match="model.safetensors: does not match the size and sha256 in ranker.json"):
            Ranker.load(directory)


@pytest.mark.parametrize(
    "field, value", [("num_items", 10**12), ("num_items", 5 * 10**7), ("num_users", 2**62), ("dim", 10**9)]
)
def test_config_sizes_are_checked_before_allocating(saved, tmp_path, field, value):
    """A config.json declaring sizes its weights do not have fails at once, naming the
    field, instead of allocating what it declares (gigabytes, or an allocator error)."""
    directory = shutil.copytree(saved[1], tmp_path / "copy")
    meta = json.loads((directory / "config.json").read_text())
    meta["config"][field] = value
    rewrite(directory, "config.json", json.dumps(meta).encode())
    started = time.perf_counter()
    with pytest.raises(ModelDirError, match=f"config.json \\(.*{field}={value}"):
        Ranker.load(directory)
    with pytest.raises(ValueError, match=f"{field}={value}"):
        load_model(directory)
    assert time.perf_counter() - started < 5  # allocating 5e7 rows took 15-40 s


def test_load_during_a_save_reads_one_save(train, tmp_path, monkeypatch):
    """A save that replaces the directory in the middle of a load (here: right after the
    load opened mappings.json): the load returns the new save's weights and seen items
    together, never one save's weights with the other's users."""
    target = save_model_dir(tmp_path / "model", mlp(train), train)
    new_model = mlp(train)
    with torch.no_grad():
        next(new_model.parameters()).add_(1.0)
    new_train = train.subset(np.arange(len(train)) % 2 == 0)  # other seen items, same ids
    real_open, swaps = builtins.open, []

    def open_then_swap(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if not swaps and os.path.abspath(os.fspath(file)) == os.path.join(target, "mappings.json"):
            swaps.append(file)
            save_model_dir(target, new_model, new_train)
        return handle

    monkeypatch.setattr(builtins, "open", open_then_swap)
    ranker = Ranker.load(target)
    monkeypatch.undo()
    assert len(swaps) == 1
    users = [100, 107, 100 + 7 * 39]
    check(ranker.score(users, k=8), reference_top_k(new_model, new_train, users, 8), users)


def test_save_refuses_to_replace_other_directories(train, tmp_path):
    """save_model_dir replaces a directory whole, so only an empty one or a model directory."""
    model = mlp(train)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine: not empty and not a rankfast model directory"):
        save_model_dir(mine, model, train)
    model.save(tmp_path / "plain")  # the model alone: not a model directory either
    with pytest.raises(FileExistsError, match="plain: not empty and not a rankfast model directory"):
        save_model_dir(tmp_path / "plain", model, train)
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(FileExistsError, match="file: exists and is not a directory"):
        save_model_dir(tmp_path / "file", model, train)
    os.symlink(mine, tmp_path / "link")
    with pytest.raises(FileExistsError, match="link: is a symbolic link"):
        save_model_dir(tmp_path / "link", model, train)
    assert (mine / "notes.txt").read_text() == "keep me" and os.listdir(mine) == ["notes.txt"]
    assert (tmp_path / "file").read_text() == "keep me too"
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "mine", "plain"]  # no scratch directory left

    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty directory, then a model directory
        Ranker.load(save_model_dir(tmp_path / "empty", model, train))


def test_leftovers_of_killed_saves_are_removed_by_the_next(train, tmp_path):
    """Scratch directories of earlier saves of the same path (a SIGKILL leaves them) go on
    the next save; a live save's, and anything not named like a scratch of that path, stay."""
    for name in (".model.0123456789ab.tmp", ".model.ffffffffffff.tmp"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    kept = [
        ".model.0123456789ab.tmp.bak",
        ".model.backup",
        ".other.0123456789ab.tmp",
        "model.0123456789ab.tmp",
        ".model.0123456789AB.tmp",
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    live = tmp_path / ".model.aaaaaaaaaaaa.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # how a save in progress holds its scratch directory
        save_model_dir(tmp_path / "model", mlp(train), train)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(["model", live.name, *kept])


def test_failed_write_leaves_nothing_half_written(train, tmp_path, monkeypatch):
    model = mlp(train)
    target = tmp_path / "model"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(
        model_dir_module, "_file_fingerprint", broken
    )  # fails once every file but ranker.json is written
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(target, model, train)
    assert os.listdir(tmp_path) == []  # neither the directory nor a temporary one

    monkeypatch.undo()
    save_model_dir(target, model, train)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    monkeypatch.setattr(model_dir_module, "_file_fingerprint", broken)
    with pytest.raises(OSError):
        save_model_dir(target, mlp(train), train, max_history=3)
    assert os.listdir(tmp_path) == ["model"]
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert json.loads((target / "ranker.json").read_text())["max_history"] == 50


def test_failed_replacement_never_deletes_the_old_directory(train, tmp_path, monkeypatch):
    """Without an atomic exchange: if the new directory cannot be renamed in and the old one
    cannot be put back either, the old one is left aside (``.model.*.old/previous``), not removed."""
    model = mlp(train)
    save_model_dir(tmp_path / "model", model, train)
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(dst) == str(tmp_path / "model"):
            raise OSError("rename refused")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        save_model_dir(tmp_path / "model", model, train)
    (aside,) = [name for name in os.listdir(tmp_path) if name.endswith(".old")]
    assert (tmp_path / aside / "previous" / "model.safetensors").read_bytes() == weights
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_files_reach_the_disk_before_the_rename(train, tmp_path, monkeypatch):
    """Every file of the new directory (and the export) is fsynced before it is renamed into place."""
    events = record_fsyncs_and_renames(monkeypatch)
    for _ in range(2):  # a new directory, then one replacing it
        events.clear()
        directory = save_model_dir(tmp_path / "model", mlp(train), train)
        (tmp,) = [
            src
            for kind, src in events
            if kind == "rename" and os.path.dirname(src) == str(tmp_path) and src.endswith(".tmp")
        ]
        before = {path for kind, path in events[: events.index(("rename", tmp))] if kind == "fsync"}
        assert {os.path.join(tmp, name) for name in os.listdir(directory)} | {tmp} <= before
        assert ("fsync", str(tmp_path)) in events[events.index(("rename", tmp)) :]  # the rename itself


def record_fsyncs_and_renames(monkeypatch) -> list:
    """``[("fsync", path) or ("rename", source), ...]`` as they happen, from now on (an
    atomic exchange of a new directory with the old one counts as its rename)."""
    events = []
    real_fsync, real_rename, real_replace, real_exchange = os.fsync, os.rename, os.replace, io_module._exchange
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", os.fspath(a))) or real_rename(a, b))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.fspath(a))) or real_replace(a, b))
    monkeypatch.setattr(
        io_module, "_exchange", lambda a, b: events.append(("rename", os.fspath(a))) or real_exchange(a, b)
    )
    return events


def _can_exchange(tmp_path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        return io_module._exchange(str(a), str(b))
    finally:
        a.rmdir(), b.rmdir()


def test_replacing_a_directory_never_leaves_the_path_empty(train, tmp_path, monkeypatch):
    """Where the system can swap directories atomically, the old model directory is never
    moved away from its path: the path always holds a complete model directory."""
    if not _can_exchange(tmp_path):
        pytest.skip("no atomic directory exchange on this system or filesystem")
    target = tmp_path / "model"
    save_model_dir(target, mlp(train), train)
    real_rename = os.rename

    def rename(src, dst):
        assert os.fspath(src) != str(target), "the old directory was moved away from its path"
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    new = mlp(train)
    with torch.no_grad():
        next(new.parameters()).add_(1.0)
    save_model_dir(target, new, train)
    assert os.listdir(tmp_path) == ["model"]  # the old directory is gone, no temporary one is left
    saved = load_model(target)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), new.state_dict().values(), strict=True))


def test_model_directory_gets_ordinary_permissions(train, tmp_path):
    """Like any file and directory made under the umask (safetensors makes its files 0600),
    so a server running as another user can read it."""
    encoder = tmp_path / "encoder-src"
    (encoder / "sub").mkdir(parents=True)
    (encoder / "sub" / "weights.bin").write_bytes(b"w")
    os.chmod(encoder / "sub" / "weights.bin", 0o600)
    old_umask = os.umask(0o022)
    try:
        for _ in range(2):  # a new directory, then one replacing it
            directory = save_model_dir(tmp_path / "model", mlp(train), train, encoder=encoder)
            modes = {}
            for root, dirs, files in os.walk(directory):
                modes.update(
                    {os.path.join(root, n): 0o755 for n in dirs} | {os.path.join(root, n): 0o644 for n in files}
                )
            assert len(modes) == 8 and os.stat(directory).st_mode & 0o777 == 0o755
            assert {path: os.stat(path).st_mode & 0o777 for path in modes} == modes
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["encoder-src", "model"]


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_export_takes_raw_ids_and_matches_score(int_train, tmp_path, kind, monkeypatch):
    model = mlp(int_train) if kind == "mlp" else attention(int_train)
    ranker = Ranker.load(save_model_dir(tmp_path / kind, model, int_train, max_history=5))
    events = record_fsyncs_and_renames(monkeypatch)
    path = ranker.export(tmp_path / f"{kind}.pt2")
    (rename,) = [n for n, (what, src) in enumerate(events) if what == "rename" and src.endswith(f".tmp/{kind}.pt2")]
    assert ("fsync", events[rename][1]) in events[:rename] and ("fsync", str(tmp_path)) in events[
        rename:
    ]  # on disk first
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted([kind, f"{kind}.pt2"])  # no temporary file left
    program = torch.export.load(path).module()

    users = [100, 107, 100 + 7 * 39]
    items = int_train.item_ids.raw.tolist()
    pair_users = torch.tensor(np.repeat(users, len(items)))
    pair_items = torch.tensor(np.tile(items, len(users)))
    args = [pair_users, pair_items]
    if model.uses_history:  # the stored histories, as raw ids; padding beyond lengths may hold anything
        history, lengths = user_histories(int_train, 5)
        rows = int_train.user_ids.index(pair_users.numpy())
        raw = torch.from_numpy(int_train.item_ids.to_raw(history[rows]))
        counted = torch.arange(5) < torch.from_numpy(lengths[rows])[:, None]
        args += [torch.where(counted, raw, -1), torch.from_numpy(lengths[rows])]
    with torch.no_grad():
        got = program(*args).view(len(users), len(items))
    for j, row in enumerate(ranker.score(users, k=len(items), exclude_seen=False)):
        want = dict(zip(row["items"], row["scores"], strict=True))
        np.testing.assert_allclose(got[j].numpy(), [want[i] for i in items], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # any number of pairs, one included
        torch.testing.assert_close(program(*[a[:1] for a in args]), got.view(-1)[:1], rtol=1e-4, atol=1e-5)

    unknown = [(5, items[0]), (users[0], 1001), (users[0], 5000)]  # unknown user, unknown items
    args = [torch.tensor([u for u, _ in unknown]), torch.tensor([i for _, i in unknown])]
    if model.uses_history:
        args += [torch.full((3, 2), items[1]), torch.tensor([2, 2, 2])]
    with torch.no_grad():
        assert torch.isnan(program(*args)).all()
    if model.uses_history:  # an unknown item within a history's length
        with torch.no_grad():
            scores = program(
                torch.tensor([users[0]] * 2),
                torch.tensor([items[0]] * 2),
                torch.tensor([[items[1], 7], [items[1], 7]]),
                torch.tensor([1, 2]),
            )
        assert not torch.isnan(scores[0]) and torch.isnan(scores[1])


def test_export_needs_integer_ids(saved, tmp_path):
    with pytest.raises(TypeError, match="export: the program takes integer ids, and this model's item ids are <U4"):
        Ranker.load(saved[1]).export(tmp_path / "x.pt2")
    assert not os.listdir(tmp_path)


def test_export_failure_is_clear(int_train, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("data-dependent control flow")

    ranker = Ranker.load(save_model_dir(tmp_path / "model", mlp(int_train), int_train))
    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(RuntimeError, match="torch.export cannot trace this MLPModel"):
        ranker.export(tmp_path / "x.pt2")
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize(
    "fields", [{}, {"normalize": False}, {"attention": "dot"}], ids=["din", "din-raw-weights", "dot-attention"]
)
def test_explain_reports_the_models_attention_weights(train, tmp_path, fields):
    """Against a hand computation: the unit's logits (or scaled dot products) over the user's
    stored history, their softmax (or the raw logits), summed per item, largest first."""
    users = np.concatenate([train.user_ids.raw[train.users], [100, 100]])  # user 100 sees two items again
    items = np.concatenate([train.item_ids.raw[train.items], ["i004", "i004"]])
    stamps = np.concatenate([train.timestamps, [10**10, 10**10 + 1]])
    data = Interactions.from_raw(users, items, timestamps=stamps)
    torch.manual_seed(4)
    config = AttentionConfig(data.num_users, data.num_items, 8, hidden=(8,), unit_hidden=(6,), **fields)
    model = AttentionModel(config).double()
    ranker = Ranker.load(save_model_dir(tmp_path / "att", model, data, max_history=5))
    user, item = 100, "i017"
    history, lengths = user_histories(data, 5)
    row = int(data.user_ids.index(np.array([user]))[0])
    past = history[row, : lengths[row]]
    assert (data.item_ids.to_raw(past)[-2:] == "i004").all()  # the repeated item, twice in the history
    with torch.no_grad():
        q = model.item_repr(torch.tensor(data.item_ids.index(np.array([item]))))[0]
        h = model.item_repr(torch.from_numpy(past))
        if config.attention == "din":
            logits = model.unit(torch.cat([h, q.expand_as(h), h - q, h * q], dim=1))[:, 0]
        else:
            logits = h @ q / np.sqrt(8)
        weights = torch.softmax(logits, 0) if config.normalize else logits
    expected = {}
    for item_id, weight in zip(data.item_ids.to_raw(past).tolist(), weights.tolist(), strict=True):
        expected[item_id] = expected.get(item_id, 0.0) + weight
    got = ranker.explain(user, item, top=10)
    assert [g["item"] for g in got] == sorted(expected, key=lambda i: -expected[i])
    assert [g["weight"] for g in got] == pytest.approx([expected[g["item"]] for g in got], rel=1e-6, abs=1e-9)
    assert ranker.explain(user, item, top=2) == got[:2]
    # Two items in one call: another batch shape, so the weights may differ in the last bits.
    batched = ranker.explain_items(user, [item, "i003"], top=3)[0]
    assert [g["item"] for g in batched] == [g["item"] for g in got[:3]]
    assert [g["weight"] for g in batched] == pytest.approx([g["weight"] for g in got[:3]], rel=1e-9, abs=1e-12)


def test_explain_sasrec_reports_the_last_blocks_attention(train, tmp_path):
    """SASRec's explanation is its history_weights over the stored history (the last block's
    attention at the last item read, summed per item), the same for every candidate; the items
    read are the last max_len of the stored history, so their weights sum to 1."""
    torch.manual_seed(5)
    config = SASRecConfig(train.num_users, train.num_items, 8, max_len=4, num_heads=2, dropout=0.0)
    model = SASRec(config).double().eval()
    ranker = Ranker.load(save_model_dir(tmp_path / "sas", model, train, max_history=6))
    user = 100
    history, lengths = user_histories(train, 6)
    row = int(train.user_ids.index(np.array([user]))[0])
    n = int(lengths[row])
    assert n > config.max_len  # the window matters
    with torch.no_grad():
        weights = model.history_weights(None, None, torch.from_numpy(history[row : row + 1]), torch.tensor([n]))[0]
    expected = {}
    for item_id, weight in zip(train.item_ids.to_raw(history[row, :n]).tolist(), weights[:n].tolist(), strict=True):
        expected[item_id] = expected.get(item_id, 0.0) + weight
    got = ranker.explain(user, "i017", top=10)
    assert [g["weight"] for g in got] == pytest.approx(sorted(expected.values(), reverse=True), rel=1e-9, abs=1e-12)
    assert {g["item"] for g in got if g["weight"] > 0} == {i for i, w in expected.items() if w > 0}
    assert sum(g["weight"] for g in got) == pytest.approx(1.0)
    assert ranker.explain(user, "i003", top=10) == got


def test_explain_errors(train, saved, tmp_path):
    with pytest.raises(TypeError, match="explain: this MLPModel does not weigh history items"):
        Ranker.load(saved[1]).explain(100, "i001")
    ranker = Ranker.load(save_model_dir(tmp_path / "att", attention(train), train, max_history=4))
    with pytest.raises(KeyError, match="user: unknown user id 5"):
        ranker.explain(5, "i001")
    with pytest.raises(KeyError, match="items"):
        ranker.explain(100, "nope")
    with pytest.raises(ValueError, match="top: expected a positive int"):
        ranker.explain(100, "i001", top=0)
