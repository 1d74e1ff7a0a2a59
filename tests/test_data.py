import numpy as np
import pytest
import torch

from rankfast.data import (
    DataFormatError,
    IdMap,
    Interactions,
    NegativeSampler,
    event_histories,
    history_features,
    leave_last_out,
    load_movielens,
    load_ncf,
    load_table,
    random_split,
    temporal_split,
    user_histories,
)


def _write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def _log(n_users=12, n_items=20, per_user=(3, 15), seed=0):
    """A random log with distinct (user, item) pairs and timestamps with ties."""
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(n_users):
        n = rng.integers(*per_user)
        users += [u * 10 + 7] * n
        items += list(rng.choice(n_items, size=n, replace=False) + 100)
        stamps += list(rng.integers(0, 6, size=n))
    return Interactions.from_raw(users, items, np.ones(len(users)), stamps)


# --- container ----------------------------------------------------------------------


def test_remapping_is_sorted_and_reversible(tmp_path):
    data = Interactions.from_raw(torch.tensor([30, 10, 30]), ["b", "a", "c"], [1, 2, 3], [5, 6, 7])
    assert data.users.tolist() == [1, 0, 1] and data.items.tolist() == [1, 0, 2]
    assert data.user_ids.to_raw(data.users).tolist() == [30, 10, 30]
    assert data.item_ids.to_raw([2]).tolist() == ["c"]
    assert (data.num_users, data.num_items, len(data)) == (2, 3, 3)
    data.save_mappings(tmp_path)
    users, items = Interactions.load_mappings(tmp_path)
    assert users == data.user_ids and items == data.item_ids
    with pytest.raises(KeyError, match="items: unknown raw id 'z'"):
        Interactions.from_raw([10], ["z"], user_ids=data.user_ids, item_ids=data.item_ids)
    with pytest.raises(ValueError, match="items: length 1 does not match users"):
        Interactions.from_raw([1, 2], [1])
    with pytest.raises(ValueError, match="raw_ids: ids must be distinct and sorted"):
        IdMap([3, 1])
    with pytest.raises(FileNotFoundError, match="directory: no mappings.json"):
        Interactions.load_mappings(tmp_path / "missing")


def test_from_pandas_frame():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"u": [5, 6, 5], "i": [1, 1, 2], "r": [3.0, 4.0, 5.0]})
    data = Interactions.from_frame(frame, user="u", item="i", rating="r")
    assert data.users.tolist() == [0, 1, 0] and data.ratings.tolist() == [3.0, 4.0, 5.0]
    assert data.timestamps is None
    with pytest.raises(KeyError, match="timestamp: column 'ts' not in the frame"):
        Interactions.from_frame(frame, user="u", item="i", timestamp="ts")


def test_user_items_csr_deduplicates():
    data = Interactions.from_raw([1, 1, 1, 3], [5, 4, 5, 4])
    indptr, indices = data.user_items()
    assert indptr.tolist() == [0, 2, 3] and indices.tolist() == [0, 1, 0]
    assert data.item_counts().tolist() == [2, 2]


# --- loaders ------------------------------------------------------------------------


def test_ml100k(tmp_path):
    _write(tmp_path / "u.data", "1\t10\t4\t881250949\n2\t20\t3\t891717742\n1\t20\t5\t878887116\n")
    flags = ["0"] * 19
    action = flags.copy()
    action[1] = "1"
    action[5] = "1"
    item_lines = [
        "|".join(["10", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *action]),
        "|".join(["20", "Café (1996)", "01-Jan-1996", "", "http://y", *flags]),
    ]
    _write(tmp_path / "u.item", "\n".join(item_lines) + "\n", encoding="latin-1")
    data = load_movielens(tmp_path)
    assert len(data) == 3 and data.ratings.tolist() == [4.0, 3.0, 5.0]
    assert data.timestamps.tolist() == [881250949, 891717742, 878887116]
    assert data.item_text == ["Toy Story (1995). Genres: Action, Comedy", "Café (1996)"]


def test_ml1m(tmp_path):
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    _write(
        tmp_path / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James (1996)::Animation|Musical\n",
        encoding="latin-1",
    )
    data = load_movielens(tmp_path)
    assert data.item_ids.to_list() == [661, 1193]
    assert data.item_text[0] == "James (1996). Genres: Animation, Musical"


def test_ml_latest(tmp_path):
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n")
    _write(
        tmp_path / "movies.csv",
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n3,X (1990),(no genres listed)\n',
    )
    data = load_movielens(tmp_path)
    assert data.ratings.tolist() == [4.0, 3.5]
    assert data.item_text == ["American President, The (1995). Genres: Comedy, Drama", "X (1990)"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("u.data", "1\t10\t4\t881250949\n2\t20\t3\n", r"u.data:2: expected 4 fields separated by '\\t', got 3"),
        ("u.data", "1\t10\t4\t881250949\n\n1\tx\t4\t1\n", r"u.data:3: item id 'x' is not a valid int"),
        ("ratings.dat", "1::10::4.5::1\n1::11::five::2\n", r"ratings.dat:2: rating 'five' is not a valid float"),
        (
            "ratings.csv",
            "user,movie,rating,timestamp\n",
            r"ratings.csv:1: expected header userId,movieId,rating,timestamp",
        ),
    ],
)
def test_malformed_movielens_lines_name_file_and_line(tmp_path, name, text, message):
    _write(tmp_path / name, text)
    with pytest.raises(DataFormatError, match=message):
        load_movielens(tmp_path)


HEADER = b"userId,movieId,rating,timestamp\n"
BIG = b"1180591620717411303424"  # 2**70


@pytest.mark.parametrize(
    "files, message",
    [
        # Bytes that are not UTF-8 were a UnicodeDecodeError without file or line.
        ({"ratings.csv": HEADER + b"1,10,4.0,100\n1,1\xff1,4.0,101\n"}, r"ratings.csv:3: not utf-8 text \(byte 4 "),
        (
            {"ratings.csv": HEADER + b"1,10,4.0,100\n", "movies.csv": b"movieId,title,genres\n10,Caf\xe9,Drama\n"},
            r"movies.csv:2: not utf-8 text",
        ),
        # Ints beyond int64 were an OverflowError.
        ({"ratings.csv": HEADER + b"1,10,4.0,100\n" + BIG + b",10,4.0,1\n"}, r"ratings.csv:3: user id '1180\d+' does"),
        (
            {"ratings.csv": HEADER + b"1,10,4.0," + BIG + b"\n"},
            r"ratings.csv:2: timestamp '1180\d+' does not fit in 64",
        ),
        # Ratings that are no finite float32 were accepted (1e39 became inf).
        ({"ratings.csv": HEADER + b"1,10,nan,100\n"}, r"ratings.csv:2: rating 'nan' is not a finite float32"),
        ({"ratings.dat": b"1::10::inf::100\n"}, r"ratings.dat:1: rating 'inf' is not a finite float32"),
        ({"u.data": b"1\t10\t1e39\t100\n"}, r"u.data:1: rating '1e39' is not a finite float32"),
        # Files without interactions gave an empty data set.
        ({"ratings.csv": b""}, r"ratings.csv: no interactions"),
        ({"ratings.csv": HEADER}, r"ratings.csv: no interactions"),
        # A field over the csv module's limit was a bare _csv.Error.
        ({"ratings.csv": HEADER + b"1,10,4.0,100\n1," + b"9" * 200_000 + b",4.0,1\n"}, r"ratings.csv:3: field larger"),
    ],
)
def test_malformed_movielens_files_name_file_and_line(tmp_path, files, message):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataFormatError, match=message):
        load_movielens(tmp_path)


def test_movielens_csv_with_a_byte_order_mark(tmp_path):
    (tmp_path / "ratings.csv").write_bytes(b"\xef\xbb\xbf" + HEADER + b"1,10,4.0,100\n2,10,3.5,101\n")
    data = load_movielens(tmp_path)
    assert data.user_ids.to_list() == [1, 2] and data.ratings.tolist() == [4.0, 3.5]


def test_movielens_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has none of u.data"):
        load_movielens(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_movielens(tmp_path / "nope")


def test_ml_latest_small(ml_latest_small):
    data = ml_latest_small
    assert (len(data), data.num_users, data.num_items) == (100836, 610, 9724)
    assert data.item_text[0].startswith("Toy Story (1995). Genres: Adventure")


def _ncf_files(tmp_path, negative_lines):
    _write(tmp_path / "t.train.rating", "0\t0\t5\t1\n0\t1\t4\t2\n1\t2\t3\t3\n")
    _write(tmp_path / "t.test.rating", "0\t2\t5\t9\n1\t0\t4\t9\n")
    _write(tmp_path / "t.test.negative", negative_lines)
    return str(tmp_path / "t")


def test_ncf_files(tmp_path):
    ncf = load_ncf(_ncf_files(tmp_path, "(0,2)\t3\t4\n(1,0)\t1\t3\n"))
    assert len(ncf.train) == 3 and len(ncf.test) == 2
    assert ncf.train.item_ids == ncf.test.item_ids and ncf.train.num_items == 5
    assert ncf.negatives.tolist() == [[3, 4], [1, 3]]


def test_ncf_files_without_timestamps(tmp_path):
    """NCF's own loader reads three columns; some of its files have only those."""
    prefix = _ncf_files(tmp_path, "(0,2)\t3\t4\n(1,0)\t1\t3\n")
    with_stamps = load_ncf(prefix)
    _write(tmp_path / "t.train.rating", "0\t0\t5\n0\t1\t4\n1\t2\t3\n")
    _write(tmp_path / "t.test.rating", "0\t2\t5\n1\t0\t4\n")
    ncf = load_ncf(prefix)
    assert ncf.train.timestamps is None and ncf.test.timestamps is None
    for got, want in ((ncf.train, with_stamps.train), (ncf.test, with_stamps.test)):
        assert (got.users.tolist(), got.items.tolist()) == (want.users.tolist(), want.items.tolist())
        assert got.ratings.tolist() == want.ratings.tolist()
    assert ncf.negatives.tolist() == with_stamps.negatives.tolist()
    _write(tmp_path / "t.train.rating", "0\t0\t5\n0\t1\t4\t7\n")
    with pytest.raises(DataFormatError, match=r"t.train.rating:2: expected 3 fields separated by '\\t', got 4"):
        load_ncf(prefix)
    _write(tmp_path / "t.train.rating", "0\t0\t5\t1\t2\n")
    with pytest.raises(DataFormatError, match=r"t.train.rating:1: expected 4 fields separated by '\\t', got 5"):
        load_ncf(prefix)


@pytest.mark.parametrize(
    "lines, message",
    [
        ("(0,2)\t3\t4\n(1,9)\t1\t3\n", r"t.test.negative:2: pair \(1,9\) does not match line 2"),
        ("(0,2)\t3\t4\n1,0\t1\t3\n", r"t.test.negative:2: expected '\(user,item\)' first"),
        ("(0,2)\t3\t4\n", r"1 lines for 2 test interactions"),
        ("(0,2)\t3\tz\n(1,0)\t1\t3\n", r"t.test.negative:1: negative item id 'z'"),
    ],
)
def test_ncf_malformed(tmp_path, lines, message):
    with pytest.raises(DataFormatError, match=message):
        load_ncf(_ncf_files(tmp_path, lines))


def test_ncf_empty_training_file(tmp_path):
    prefix = _ncf_files(tmp_path, "(0,2)\t3\t4\n(1,0)\t1\t3\n")
    _write(tmp_path / "t.train.rating", "")
    with pytest.raises(DataFormatError, match=r"t.train.rating: no interactions"):
        load_ncf(prefix)


def test_csv_table_with_column_mapping(tmp_path):
    path = _write(tmp_path / "log.tsv", "ts\tclient\tproduct\tscore\n5\tu1\tp9\t1\n3\tu2\tp9\t0\n")
    data = load_table(path, user="client", item="product", rating="score", timestamp="ts", sep="\t")
    assert data.user_ids.to_list() == ["u1", "u2"] and data.timestamps.tolist() == [5, 3]
    with pytest.raises(KeyError, match="rating: column 'stars' not in the header"):
        load_table(path, user="client", item="product", rating="stars", sep="\t")
    bad = _write(tmp_path / "bad.csv", "u,i,r\n1,2,3\n1,2\n")
    with pytest.raises(DataFormatError, match=r"bad.csv:3: expected 3 fields"):
        load_table(bad, user="u", item="i", rating="r")
    bad = _write(tmp_path / "bad2.csv", "u,i,r\n1,2,x\n")
    with pytest.raises(DataFormatError, match=r"bad2.csv:2: r 'x' is not a valid float"):
        load_table(bad, user="u", item="i", rating="r")
    for text, message in (
        (b"u,i,r\n1,2,3\n1,\xfe,3\n", r"bad3.csv:3: not utf-8 text"),
        (b"u,i,r,t\n1,2,3,1\n1,2,3," + b"1180591620717411303424\n", r"bad3.csv:3: t '1180\d+' does not fit in 64 bits"),
        (b"u,i,r\n1,2,NaN\n", r"bad3.csv:2: r 'NaN' is not a finite float32"),
        (b"u,i,r\n", r"bad3.csv: no interactions"),
    ):
        (tmp_path / "bad3.csv").write_bytes(text)
        with pytest.raises(DataFormatError, match=message):
            load_table(tmp_path / "bad3.csv", user="u", item="i", rating="r", timestamp="t" if b",t" in text else None)
    # Ids beyond int64 are ids all the same: strings, as for any non-integer id (was an OverflowError).
    big = _write(tmp_path / "big.csv", "u,i\n1180591620717411303424,2\n7,2\n")
    assert load_table(big, user="u", item="i").user_ids.to_list() == ["1180591620717411303424", "7"]


def test_parquet_table(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [3, 1, 3], "item": [7, 7, 8], "clicked": [1.0, 0.0, 1.0]}), path)
    data = load_table(path, user="user", item="item", rating="clicked")
    assert data.users.tolist() == [1, 0, 1] and data.ratings.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="item: column 'product' not in"):
        load_table(path, user="user", item="product")


# --- splits -------------------------------------------------------------------------


def _pairs(data):
    return set(zip(data.users.tolist(), data.items.tolist(), strict=True))


def test_temporal_split_leaks_nothing():
    data = _log()
    train, test = temporal_split(data, 0.25)
    assert _pairs(train) | _pairs(test) == _pairs(data) and not _pairs(train) & _pairs(test)
    for u in range(data.num_users):
        n = int((data.users == u).sum())
        tr = [(t, i) for t, i, uu in zip(train.timestamps, train.items, train.users, strict=True) if uu == u]
        te = [(t, i) for t, i, uu in zip(test.timestamps, test.items, test.users, strict=True) if uu == u]
        assert len(te) == int(np.floor(n * 0.25))
        if tr and te:
            assert max(tr) < min(te)  # by (timestamp, item id)
    with pytest.raises(ValueError, match="test_ratio: must lie in"):
        temporal_split(data, 1.5)


def test_leave_last_out_and_random_split():
    data = _log(per_user=(1, 6))
    train, test = leave_last_out(data)
    counts = np.bincount(data.users, minlength=data.num_users)
    assert np.array_equal(np.bincount(test.users, minlength=data.num_users), (counts > 1).astype(int))
    for u, i, t in zip(test.users, test.items, test.timestamps, strict=True):
        mine = data.users == u
        assert (t, i) == max(zip(data.timestamps[mine], data.items[mine], strict=True))
    train, test = random_split(data, 0.3, seed=1)
    assert len(test) == round(len(data) * 0.3) and _pairs(train) | _pairs(test) == _pairs(data)
    assert not _pairs(train) & _pairs(test)
    assert _pairs(random_split(data, 0.3, seed=1)[1]) == _pairs(test)
    with pytest.raises(ValueError, match="needs timestamps"):
        leave_last_out(Interactions.from_raw([1], [1]))


# --- negatives and histories --------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_negative_sampler_never_returns_positives(distribution):
    data = _log(n_users=30, n_items=25, per_user=(5, 24), seed=3)
    sampler = NegativeSampler(data, distribution=distribution, alpha=0.5)
    users = np.repeat(np.arange(data.num_users), 50)
    negatives = sampler.sample(users, 7, np.random.default_rng(0))
    assert negatives.shape == (len(users), 7)
    positives = _pairs(data)
    assert not any((u, i) in positives for u, row in zip(users, negatives, strict=True) for i in row)


def test_popularity_sampler_follows_count_power():
    data = Interactions.from_raw([0, 0, 1, 2, 3, 3, 4, 4, 4, 5], [0, 1, 1, 1, 2, 1, 2, 3, 5, 6])
    sampler = NegativeSampler(data, distribution="popularity", alpha=0.5)
    counts = data.item_counts()
    expected = counts**0.5 * (np.arange(data.num_items) != 1)  # user 2's only positive is item 1
    expected = expected / expected.sum()
    draws = sampler.sample(np.full(40000, 2), 1, np.random.default_rng(5)).ravel()
    observed = np.bincount(draws, minlength=data.num_items) / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.01)
    assert np.exp(sampler.log_prob([1])) == pytest.approx(counts[1] ** 0.5 / (counts**0.5).sum())


def test_negative_sampler_errors():
    data = Interactions.from_raw([0, 0, 1], [0, 1, 0])
    with pytest.raises(ValueError, match="users: user 0 has no item left"):
        NegativeSampler(data).sample([0, 1], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distribution: expected"):
        NegativeSampler(data, distribution="zipf")


def _history_rows_reference(data, half_life, floor):
    """history_features by hand: a Python loop over each user's events in (time, item) order."""
    rows = np.zeros((data.num_users, data.num_items))
    for u in range(data.num_users):
        events = sorted((t, i) for t, i, uu in zip(data.timestamps, data.items, data.users, strict=True) if uu == u)
        for back, (_, item) in enumerate(reversed(events)):
            weight = 1.0 if half_life is None else floor + (1 - floor) * 0.5 ** (back / half_life)
            rows[u, item] = max(rows[u, item], weight)
        norm = np.sqrt((rows[u] ** 2).sum())
        rows[u] /= norm if norm else 1.0
    return rows


@pytest.mark.parametrize("half_life, floor", [(None, 0.0), (1.0, 0.0), (2.5, 0.3), (0.5, 1.0)])
def test_history_features_against_a_hand_loop(half_life, floor):
    data = _log(seed=5)
    # A repeated item (an older and a newer event) and a user with no events in this slice.
    data = Interactions(
        np.append(data.users, [0, 0]),
        np.append(data.items, [data.items[0], data.items[0]]),
        None,
        np.append(data.timestamps, [-5, 99]),
        data.user_ids,
        data.item_ids,
    )
    data = data.subset(data.users != 3)
    rows = history_features(data, half_life=half_life, floor=floor)
    assert rows.dtype == torch.float32 and rows.shape == (data.num_users, data.num_items)
    np.testing.assert_allclose(rows.numpy(), _history_rows_reference(data, half_life, floor), rtol=1e-6, atol=1e-7)
    assert not rows[3].any(), "a user without items gets a zero row"


def test_history_features_weights_by_hand():
    """User 0: items 2, 0, 1 at times 1, 2, 3; half-life 1, floor 0.2: weights 0.4, 0.6, 1."""
    data = Interactions.from_raw([5, 5, 5], [12, 10, 11], None, [1, 2, 3])
    expected = np.array([0.6, 1.0, 0.4]) / np.sqrt(0.36 + 1.0 + 0.16)
    np.testing.assert_allclose(history_features(data, half_life=1.0, floor=0.2).numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(history_features(data).numpy()[0], np.full(3, 3**-0.5), rtol=1e-6)


def test_history_features_rejects_bad_input():
    data = _log(seed=6)
    for half_life in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="half_life: must be a positive number"):
            history_features(data, half_life=half_life)
    for floor in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="floor: must lie in"):
            history_features(data, half_life=2.0, floor=floor)
    with pytest.raises(ValueError, match="floor: weighs items by recency"):
        history_features(data, floor=0.5)
    untimed = Interactions(data.users, data.items, None, None, data.user_ids, data.item_ids)
    with pytest.raises(ValueError, match="needs timestamps"):
        history_features(untimed, half_life=2.0)
    assert history_features(untimed).shape == (data.num_users, data.num_items), "binary rows need no timestamps"


def test_event_histories_see_only_earlier_items():
    data = _log(seed=4)
    max_len = 4
    history, lengths = event_histories(data, max_len)
    for row in range(len(data)):
        u, key = data.users[row], (data.timestamps[row], data.items[row])
        earlier = sorted(
            (t, i) for t, i, uu in zip(data.timestamps, data.items, data.users, strict=True) if uu == u and (t, i) < key
        )
        expected = [i for _, i in earlier][-max_len:]
        assert lengths[row] == len(expected)
        assert history[row, : lengths[row]].tolist() == expected
        assert not history[row, lengths[row] :].any()
    user_h, user_l = user_histories(data, max_len)
    for u in range(data.num_users):
        mine = sorted((t, i) for t, i, uu in zip(data.timestamps, data.items, data.users, strict=True) if uu == u)
        assert user_h[u, : user_l[u]].tolist() == [i for _, i in mine][-max_len:]
    with pytest.raises(ValueError, match="max_len: must be at least 1"):
        event_histories(data, 0)
