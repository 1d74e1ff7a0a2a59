"""rankfast.Ranker: model directories, scoring by raw ids against a float64 reference,
micro-batching, threads, cold start, corrupted directories, torch.export."""

import json
import os
import threading

import numpy as np
import pytest
import torch

import rankfast
import rankfast._io as io_module
import rankfast.ranker as ranker_module
from rankfast import Ranker
from rankfast.data import Interactions, synthetic_interactions, user_histories
from rankfast.models import AttentionConfig, AttentionModel, DotConfig, DotModel, MLPConfig, MLPModel, load_model
from rankfast.ranker import ModelDirError, save_model_dir

NUM_USERS, NUM_ITEMS = 40, 30


@pytest.fixture(scope="module")
def train():
    """Synthetic interactions under non-contiguous int user ids and string item ids."""
    data = synthetic_interactions(NUM_USERS, NUM_ITEMS, per_user=6, seed=3)
    raw_items = np.array([f"i{n:03d}" for n in range(NUM_ITEMS)])
    return Interactions.from_raw(100 + 7 * data.users, raw_items[data.items], timestamps=data.timestamps)


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
    for row, (items, scores) in zip(results, expected):
        assert row["items"] == items
        np.testing.assert_allclose(row["scores"], scores, rtol=1e-5, atol=1e-6)


def test_directory_layout_and_score_against_reference(saved, train):
    model, directory = saved
    assert sorted(os.listdir(directory)) == ["config.json", "mappings.json", "model.safetensors", "ranker.json", "users.safetensors"]
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
    requests = [{"users": [100], "k": 3}, {"users": [107, 114], "k": 7}, {"users": [121], "k": 2, "exclude_seen": False}]
    expected = [ranker.score(**r) for r in requests]
    calls = []
    real = rankfast.score
    monkeypatch.setattr(rankfast, "score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = ranker.score_many(requests)
    assert len(calls) == 2  # the two exclude_seen=True requests share one call
    for rows, want in zip(got, expected):  # a bigger batch may round the last bit differently
        assert [(r["user"], r["items"]) for r in rows] == [(r["user"], r["items"]) for r in want]
        np.testing.assert_allclose([s for r in rows for s in r["scores"]], [s for r in want for s in r["scores"]], rtol=1e-6)


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
    config = DotConfig(num_users=train.num_users, num_items=train.num_items, dim=5, user_feature_dim=6, item_feature_dim=6)
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
    expected_items = train.item_ids.to_raw(torch.argsort(scores, descending=True)[:6].numpy()).tolist()
    assert got[0]["items"] == expected_items
    np.testing.assert_allclose(got[0]["scores"], torch.sort(scores, descending=True).values[:6].detach().numpy(), rtol=1e-5)
    empty = m.user_repr.projection(torch.zeros(6, dtype=torch.float64))  # no history: a zero vector
    assert got[2]["items"][0] == train.item_ids.to_raw([int(torch.argmax(m.item_repr.all() @ empty + m.item_bias))])[0]
    m.float()
    check(got[1:2], reference_top_k(model, train, [107], 6), [107])
    assert model.config.num_users == train.num_users  # the served model is untouched

    id_model = Ranker.load(save_model_dir(tmp_path / "ids", mlp(train), train), cold_start=True)
    with pytest.raises(ValueError, match="cannot score new users"):
        id_model.score([5])


def test_cold_start_history_ids_are_matched_exactly(train, tmp_path):
    """An unknown history id is an error, never cast into a known one ('i0049' is not 'i004')."""
    model, _ = pooled_dot_model(train)
    ranker = Ranker.load(save_model_dir(tmp_path / "cold", model, train), cold_start=True)
    for history in (["i0049"], ["i002", "i011x"], "i004"):
        with pytest.raises((KeyError, TypeError), match="histories"):
            ranker.score([5], histories={5: history})
    plain = Ranker.load(_plain_dir(model, tmp_path), cold_start=True)  # integer raw ids
    with pytest.raises(KeyError, match="unknown raw id 2.5"):
        plain.score([1000], histories={1000: [2.5]})
    # Equal ids in another container or width score the same as the list of str.
    want = ranker.score([5], histories={5: ["i004", "i011"]})
    assert ranker.score([5], histories={5: np.array(["i004", "i011"], dtype="<U8")}) == want


def _plain_dir(model, tmp_path):
    model.save(tmp_path / "plain")
    return tmp_path / "plain"


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


def test_plain_model_save_directory_loads(train, tmp_path):
    model = mlp(train)
    model.save(tmp_path / "plain")
    ranker = Ranker.load(tmp_path / "plain")  # raw ids are the contiguous ids; nothing counts as seen
    with torch.no_grad():
        scores = model.double()(torch.full((train.num_items,), 3), torch.arange(train.num_items))
    assert ranker.score([3], k=3)[0]["items"] == torch.argsort(scores, descending=True)[:3].tolist()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(os.path.join(d, "model.safetensors")), "model.safetensors: no such file"),
        (lambda d: _truncate(os.path.join(d, "model.safetensors")), "not a readable safetensors"),
        (lambda d: _write(os.path.join(d, "config.json"), "{not json"), "not a rankfast model config"),
        (lambda d: _write(os.path.join(d, "mappings.json"), '{"users": [1, 2], "items": ["a"]}'), "maps 2 users and 1 items"),
        (lambda d: _truncate(os.path.join(d, "users.safetensors")), "users.safetensors: not a readable"),
        (lambda d: _write(os.path.join(d, "ranker.json"), "[]"), "expected a JSON object"),
    ],
)
def test_corrupted_directory_fails_clearly(saved, tmp_path, damage, message):
    import shutil

    directory = shutil.copytree(saved[1], tmp_path / "copy")
    damage(str(directory))
    with pytest.raises(ModelDirError, match=message):
        Ranker.load(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        Ranker.load(tmp_path / "nothing")


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_leftovers_of_killed_saves_are_removed_by_the_next(train, tmp_path):
    """Scratch directories of earlier saves of the same path (a SIGKILL leaves them) go on
    the next save; a live save's, and anything not named like a scratch of that path, stay."""
    for name in (".model.0123456789ab.tmp", ".model.ffffffffffff.tmp"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    kept = [".model.0123456789ab.tmp.bak", ".model.backup", ".other.0123456789ab.tmp", "model.0123456789ab.tmp", ".model.0123456789AB.tmp"]
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

    monkeypatch.setattr(ranker_module, "save_file", broken)  # fails after config and weights are written
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(target, model, train)
    assert os.listdir(tmp_path) == []  # neither the directory nor a temporary one

    monkeypatch.undo()
    save_model_dir(target, model, train)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    monkeypatch.setattr(ranker_module, "save_file", broken)
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
        (tmp,) = [src for kind, src in events if kind == "rename" and os.path.dirname(src) == str(tmp_path) and src.endswith(".tmp")]
        before = {path for kind, path in events[: events.index(("rename", tmp))] if kind == "fsync"}
        assert {os.path.join(tmp, name) for name in os.listdir(directory)} | {tmp} <= before
        assert ("fsync", str(tmp_path)) in events[events.index(("rename", tmp)) :]  # the rename itself


def record_fsyncs_and_renames(monkeypatch) -> list:
    """``[("fsync", path) or ("rename", source), ...]`` as they happen, from now on (an
    atomic exchange of a new directory with the old one counts as its rename)."""
    events = []
    real_fsync, real_rename, real_replace, real_exchange = os.fsync, os.rename, os.replace, io_module._exchange
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", os.fspath(a))) or real_rename(a, b))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.fspath(a))) or real_replace(a, b))
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: events.append(("rename", os.fspath(a))) or real_exchange(a, b))
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
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), new.state_dict().values()))


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
                modes.update({os.path.join(root, n): 0o755 for n in dirs} | {os.path.join(root, n): 0o644 for n in files})
            assert len(modes) == 8 and os.stat(directory).st_mode & 0o777 == 0o755
            assert {path: os.stat(path).st_mode & 0o777 for path in modes} == modes
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["encoder-src", "model"]


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_export_round_trips(train, tmp_path, kind, monkeypatch):
    torch.manual_seed(3)
    if kind == "mlp":
        model = mlp(train)
    else:
        model = AttentionModel(AttentionConfig(num_users=train.num_users, num_items=train.num_items, dim=8, hidden=(8,), unit_hidden=(6,)))
    ranker = Ranker.load(save_model_dir(tmp_path / kind, model, train))
    events = record_fsyncs_and_renames(monkeypatch)
    path = ranker.export(tmp_path / f"{kind}.pt2")
    (rename,) = [n for n, (what, src) in enumerate(events) if what == "rename" and src.endswith(f".tmp/{kind}.pt2")]
    assert ("fsync", events[rename][1]) in events[:rename] and ("fsync", str(tmp_path)) in events[rename:]  # on disk first
    program = torch.export.load(path).module()
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7):  # any number of pairs
        args = [torch.randint(0, train.num_users, (n,), generator=gen), torch.randint(0, train.num_items, (n,), generator=gen)]
        if model.uses_history:
            args += [torch.randint(0, train.num_items, (n, 5), generator=gen), torch.randint(0, 6, (n,), generator=gen)]
        with torch.no_grad():
            torch.testing.assert_close(program(*args), model(*args))
    assert sorted(os.listdir(tmp_path)) == sorted([kind, f"{kind}.pt2"])  # no temporary file left


def test_export_failure_is_clear(saved, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(RuntimeError, match="torch.export cannot trace this MLPModel"):
        Ranker.load(saved[1]).export(tmp_path / "x.pt2")
    assert not os.listdir(tmp_path)
