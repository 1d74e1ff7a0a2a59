"""rankfast.topk / topk_merge against a numpy reference, on every backend."""

import os
import threading

import numpy as np
import pytest
import torch

import rankfast
import rankfast.selection as topk_module

BACKENDS = [
    "cpp",
    "torch-cpu",
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def reference_topk(x, k, largest=True, exclude=None):
    """Stable sort on (NaN last, -score, index); excluded ids removed; k clamped to n; padded."""
    x = np.asarray(x, dtype=np.float64)  # exact for every float input dtype
    rows, n = x.shape
    k = min(k, n)
    fill = -np.inf if largest else np.inf
    values = np.full((rows, k), fill)
    ids = np.full((rows, k), -1, dtype=np.int64)
    for r in range(rows):
        skip = set() if exclude is None else {int(e) for e in exclude[r]}
        cand = np.array([j for j in range(n) if j not in skip], dtype=np.int64)
        row = x[r, cand]
        nan = np.isnan(row)
        key = np.where(nan, 0.0, -row if largest else row)
        order = cand[np.lexsort((cand, key, nan))][:k]
        ids[r, : len(order)] = order
        values[r, : len(order)] = x[r, order]
    return values, ids


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test through the C++ extension, the CPU torch fallback, or CUDA."""
    if request.param == "torch-cpu":
        monkeypatch.setattr(topk_module, "_C", None)
        monkeypatch.setattr(topk_module, "_fallback_warned", True)
    elif request.param == "cpp" and not rankfast.extension_available():
        pytest.skip("C++ extension not built (RANKFAST_SKIP_EXT=1)")
    return request.param


def run_topk(backend, x, k, **kw):
    """Calls rankfast.topk on `backend` with a float32/64 numpy array; numpy results."""
    if backend == "cuda":
        values, ids = rankfast.topk(torch.from_numpy(x).cuda(), k, **kw)
        return values.cpu().numpy(), ids.cpu().numpy()
    return rankfast.topk(x, k, **kw)


def check(backend, x, k, largest=True, exclude=None, per_row_exclude=None, **kw):
    """Compares with the reference; `per_row_exclude` spells `exclude` as lists when it is CSR."""
    values, ids = run_topk(backend, x, k, largest=largest, exclude=exclude, **kw)
    per_row_exclude = exclude if per_row_exclude is None else per_row_exclude
    ref_values, ref_ids = reference_topk(x, k, largest=largest, exclude=per_row_exclude)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(values, ref_values.astype(x.dtype))
    assert ids.dtype == np.int64 and values.dtype == x.dtype


def special_rows(rng, n):
    """Rows that stress ordering rules: ties, NaN, infinities, signed zeros."""
    rows = [
        rng.random(n),
        np.arange(n, dtype=np.float64),  # ascending: every entry beats the last
        np.arange(n, dtype=np.float64)[::-1].copy(),  # descending
        np.full(n, 0.5),  # all equal: ties by index
        rng.integers(0, 4, n).astype(np.float64),  # many duplicates
    ]
    mixed = rng.standard_normal(n)
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, np.nan]
    positions = rng.choice(n, size=min(n, 4 * len(specials)), replace=False)
    for p, s in zip(positions, specials * 4, strict=False):  # n may hold fewer positions than specials
        mixed[p] = s
    rows.append(mixed)
    nan_first = rng.random(n)
    nan_first[: n // 2] = np.nan  # NaN fills the heap first, then numbers displace it
    rows.append(nan_first)
    return np.stack(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (7, 10), (300, 10), (300, 200), (5000, 10), (5000, 64)])
def test_matches_reference(backend, dtype, largest, n, k):
    rng = np.random.default_rng(n * 31 + k)
    x = special_rows(rng, n).astype(dtype)
    check(backend, x, k, largest=largest)


def test_large_rows_take_every_selection_path(backend):
    # heap with threshold pre-filter (random), churn -> buffered quickselect
    # (ascending), k large relative to n (nth_element directly), many rows
    # split across threads.
    rng = np.random.default_rng(0)
    n = 40_000
    x = np.stack([rng.random(n), np.arange(n), -np.arange(n), rng.integers(0, 3, n)]).astype(np.float32)
    for k in (1, 10, 100, 3000):
        check(backend, x, k)
    many = rng.random((64, 2000)).astype(np.float32)
    check(backend, many, 17, num_threads=2)


def test_rows_that_defeat_strided_sampling(backend):
    # The best values sit on a regular grid, so any strided sample of a row
    # overestimates how many entries beat it; results must not change.
    rng = np.random.default_rng(12)
    n = 40_000
    rows = []
    for stride in (97, 128, 156, 157, 256):
        row = rng.random(n) * 0.5
        row[::stride] = 1.0 + rng.random(len(row[::stride]))
        rows.append(row)
    x = np.stack(rows).astype(np.float32)
    for k in (10, 100, 400):
        check(backend, x, k)
        check(backend, x, k, largest=False)
        check(backend, -x, k)


def test_one_dimensional_and_single_row(backend):
    rng = np.random.default_rng(1)
    x = rng.random(50).astype(np.float32)
    values, ids = run_topk(backend, x[None, :], 5)
    ref_values, ref_ids = reference_topk(x[None, :], 5)
    np.testing.assert_array_equal(ids, ref_ids)
    if backend != "cuda":
        v1, i1 = rankfast.topk(x, 5)
        assert v1.shape == (5,) and i1.shape == (5,)
        np.testing.assert_array_equal(i1, ref_ids[0])
        v1, i1 = rankfast.topk(x, 5, exclude=[int(ref_ids[0, 0])])
        np.testing.assert_array_equal(i1, reference_topk(x[None, :], 5, exclude=[[ref_ids[0, 0]]])[1][0])


def test_k_zero_and_empty_rows(backend):
    x = np.random.default_rng(2).random((3, 8)).astype(np.float32)
    values, ids = run_topk(backend, x, 0)
    assert values.shape == (3, 0) and ids.shape == (3, 0)
    values, ids = run_topk(backend, np.zeros((2, 0), np.float32), 3)
    assert values.shape == ids.shape == (2, 0)
    values, ids = run_topk(backend, np.zeros((0, 5), np.float32), 3)
    assert values.shape == (0, 3)


@pytest.mark.parametrize("k", [9, 10**12, 2**70])
def test_k_is_clamped_to_the_row_length(backend, k):
    """Results are [rows, min(k, n)]: a huge k costs what k = n does (it used to allocate [rows, k])."""
    rng = np.random.default_rng(12)
    x = rng.random((3, 8)).astype(np.float32)
    exclude = [[1, 2], [], list(range(8))]
    for excl in (None, exclude):
        values, ids = run_topk(backend, x, k, exclude=excl)
        ref_values, ref_ids = reference_topk(x, 8, exclude=excl)
        assert ids.shape == (3, 8)
        np.testing.assert_array_equal(ids, ref_ids)  # excluded entries leave padding, up to n
        np.testing.assert_array_equal(values, ref_values.astype(np.float32))
    values, ids = run_topk(backend, x[0], k)
    assert ids.shape == (8,)


@pytest.mark.parametrize("largest", [True, False])
def test_exclusion_forms(backend, largest):
    rng = np.random.default_rng(3)
    rows, n = 6, 40
    x = rng.integers(0, 5, (rows, n)).astype(np.float32)
    per_row = [rng.choice(n, size=s, replace=False) for s in (0, 1, 5, 39, 40, 12)]
    per_row[5] = np.concatenate([per_row[5], per_row[5][:3]])  # duplicates are fine
    check(backend, x, 8, largest=largest, exclude=per_row)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in per_row])])
    csr = (indptr, np.concatenate(per_row))
    check(backend, x, 8, largest=largest, exclude=csr, per_row_exclude=per_row)

    class ScipyLikeCSR:
        def __init__(self, indptr, indices):
            self.indptr, self.indices = indptr, indices

    check(backend, x, 8, largest=largest, exclude=ScipyLikeCSR(*csr), per_row_exclude=per_row)
    # Rows whose eligible entries run out are padded.
    values, ids = run_topk(backend, x, 8, largest=largest, exclude=per_row)
    assert (ids[4] == -1).all() and (values[4] == (-np.inf if largest else np.inf)).all()
    assert (ids[3, 1:] == -1).all() and ids[3, 0] >= 0


def test_unsorted_returns_the_same_set(backend):
    rng = np.random.default_rng(4)
    x = rng.random((5, 3000)).astype(np.float32)
    exclude = [rng.choice(3000, 2990, replace=False) if r == 2 else [] for r in range(5)]
    values, ids = run_topk(backend, x, 25, sorted=False, exclude=exclude)
    _, ref_ids = reference_topk(x, 25, exclude=exclude)
    for r in range(5):
        assert sorted(ids[r][ids[r] >= 0]) == sorted(ref_ids[r][ref_ids[r] >= 0])
        valid = ids[r] >= 0
        np.testing.assert_array_equal(values[r][valid], x[r, ids[r][valid]])
    assert (ids[2, 10:] == -1).all(), "padding comes last even unsorted"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_torch_dtypes_follow_the_input(backend, dtype):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(special_rows(rng, 200)).to(dtype)
    device = "cuda" if backend == "cuda" else "cpu"
    values, ids = rankfast.topk(x.to(device), 9)
    assert isinstance(values, torch.Tensor) and values.dtype == dtype and ids.dtype == torch.int64
    assert values.device.type == device
    ref_values, ref_ids = reference_topk(x.double().numpy(), 9)
    np.testing.assert_array_equal(ids.cpu().numpy(), ref_ids)
    np.testing.assert_array_equal(values.cpu().double().numpy(), ref_values)


def test_numpy_float16(backend):
    if backend == "cuda":
        pytest.skip("numpy input never reaches CUDA")
    x = special_rows(np.random.default_rng(6), 100).astype(np.float16)
    values, ids = rankfast.topk(x, 7, largest=False)
    ref_values, ref_ids = reference_topk(x, 7, largest=False)
    assert values.dtype == np.float16
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(values, ref_values.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_contiguous_input_is_copied_not_misread(backend, dtype):
    rng = np.random.default_rng(7)
    base = rng.random((300, 40)).astype(dtype)
    x = base.T  # [40, 300], Fortran-ordered view
    assert not x.flags.c_contiguous
    check(backend, x, 6)
    shards = x[:, :150], x[:, 150:]  # strided shard values (float16 ones were a pybind11 TypeError)
    ids = [np.broadcast_to(np.arange(150) + lo, (40, 150)) for lo in (0, 150)]
    values, merged = rankfast.topk_merge(list(shards), ids, 6)
    ref_values, ref_ids = reference_topk(x, 6)
    np.testing.assert_array_equal(merged, ref_ids)
    np.testing.assert_array_equal(values, ref_values.astype(dtype))
    t = torch.from_numpy(base).t()
    values, ids = rankfast.topk(t.cuda() if backend == "cuda" else t, 6)
    np.testing.assert_array_equal(ids.cpu().numpy(), reference_topk(x, 6)[1])


def test_merge_equals_topk_of_the_whole(backend):
    rng = np.random.default_rng(8)
    rows, n, k = 9, 1000, 20
    x = special_rows(rng, n)[:, :n].astype(np.float32)
    x = np.concatenate([x, rng.integers(0, 3, (rows - len(x), n)).astype(np.float32)])
    bounds = [0, 130, 131, 600, 1000]  # uneven shards, one of a single item
    shard_values, shard_ids = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        v, i = reference_topk(x[:, lo:hi], k)
        shard_values.append(v.astype(np.float32))
        shard_ids.append(np.where(i >= 0, i + lo, -1))
    ref_values, ref_ids = reference_topk(x, k)
    # Shards in reverse order: ties must still go to the lower id, not the earlier shard.
    shard_values, shard_ids = shard_values[::-1], shard_ids[::-1]
    if backend == "cuda":
        shard_values = [torch.from_numpy(v).cuda() for v in shard_values]
        shard_ids = [torch.from_numpy(i).cuda() for i in shard_ids]
    values, ids = rankfast.topk_merge(shard_values, shard_ids, k)
    if backend == "cuda":
        values, ids = values.cpu().numpy(), ids.cpu().numpy()
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(values, ref_values.astype(np.float32))
    # More k than entries: k is clamped to the entries; padding inputs (-1) are ignored, and padded.
    v, i = rankfast.topk_merge(np.array([[1.0, 2.0, 0.0]]), np.array([[5, -1, 2]]), 4)
    np.testing.assert_array_equal(i, [[5, 2, -1]])
    np.testing.assert_array_equal(v, [[1.0, 0.0, -np.inf]])


@pytest.mark.parametrize("largest", [True, False])
def test_merge_returns_the_values_given(backend, largest):
    """Values come back bit for bit: -0.0 stays -0.0 (the C++ merge rebuilt it as +0.0 from its sort key)."""
    if backend == "cuda":
        pytest.skip("numpy input never reaches CUDA")
    values = np.array([[-0.0, 1.0, 0.0, -1.0], [0.0, -0.0, np.nan, 2.0]], np.float32)
    values[1, 2] = np.frombuffer(np.uint32(0xFFC00001).tobytes(), np.float32)[0]  # a NaN with a payload
    ids = np.array([[3, 4, 9, 7], [5, 2, 8, -1]])
    got_values, got_ids = rankfast.topk_merge(values, ids, 4, largest=largest)
    for row in range(2):
        for value, item in zip(got_values[row], got_ids[row], strict=True):
            if item >= 0:
                given = values[row][ids[row] == item][0]
                assert value.tobytes() == given.tobytes(), (row, item, value, given)
    # -0.0 ties 0.0, so the lower id comes first; the value stays its own.
    if largest:
        np.testing.assert_array_equal(got_ids, [[4, 3, 9, 7], [2, 5, 8, -1]])
        assert np.signbit(got_values[0, 1]) and not np.signbit(got_values[0, 2])
        assert np.signbit(got_values[1, 0]) and not np.signbit(got_values[1, 1])


def test_merge_rejects_unsigned_ids_that_would_wrap(backend):
    """uint64 2**64 - 1 was cast to -1 and silently dropped as padding."""
    if backend == "cuda":
        pytest.skip("argument checks do not depend on the device")
    values = np.array([[5.0, 1.0]], np.float32)
    for ids in (np.array([[2**64 - 1, 1]], np.uint64), torch.tensor([[2**64 - 1, 1]], dtype=torch.uint64)):
        with pytest.raises(ValueError, match=r"indices: ids must lie in \[-1, 2\^32 - 1\)"):
            rankfast.topk_merge(values, ids, 2)
    got_values, got_ids = rankfast.topk_merge(values, np.array([[7, 1]], np.uint64), 2)
    np.testing.assert_array_equal(got_ids, [[7, 1]])


def test_concurrent_python_threads_match_serial(backend):
    rng = np.random.default_rng(9)
    inputs = [rng.random((32, 4000)).astype(np.float32) for _ in range(8)]
    excludes = [[rng.choice(4000, 50) for _ in range(32)] for _ in range(8)]
    serial = [run_topk(backend, x, 30, exclude=e) for x, e in zip(inputs, excludes, strict=True)]
    results = [None] * 8

    def work(i):
        for _ in range(3):
            results[i] = run_topk(backend, inputs[i], 30, exclude=excludes[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (sv, si), (cv, ci) in zip(serial, results, strict=True):
        np.testing.assert_array_equal(si, ci)
        np.testing.assert_array_equal(sv, cv)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: rankfast.topk(x, -1), ValueError, "k must be >= 0"),
        (lambda x: rankfast.topk(x, 2.0), TypeError, "k:"),
        (lambda x: rankfast.topk(x[None], 2), ValueError, "scores: expected 1-D or 2-D"),
        (lambda x: rankfast.topk(x.astype(np.int32), 2), TypeError, "scores: unsupported dtype"),
        (lambda x: rankfast.topk(x.tolist(), 2), TypeError, "scores: expected a numpy array"),
        (lambda x: rankfast.topk(x, 2, exclude=[[0]]), ValueError, "exclude: expected one id sequence per row"),
        (lambda x: rankfast.topk(x, 2, exclude=[[0], [10]]), ValueError, r"exclude: id 10 out of range \[0, 10\)"),
        (lambda x: rankfast.topk(x, 2, exclude=[[-1], []]), ValueError, "exclude: id -1 out of range"),
        (lambda x: rankfast.topk(x, 2, exclude=[[0.5], []]), TypeError, "exclude"),
        (lambda x: rankfast.topk(x, 2, exclude=(np.array([0, 1]), np.array([3]))), ValueError, "indptr must have"),
        (lambda x: rankfast.topk(x, 2, exclude=(np.array([0, 2, 1]), np.array([3]))), ValueError, "indptr must start"),
        (lambda x: rankfast.topk(x, 2, exclude=5), TypeError, "exclude"),
        (lambda x: rankfast.topk(x, 2, num_threads=0), ValueError, "num_threads"),
        (lambda x: rankfast.topk_merge(x, np.zeros((2, 9), np.int64), 2), ValueError, "indices: shape"),
        (lambda x: rankfast.topk_merge(x, np.full((2, 10), -2), 2), ValueError, "indices: ids must lie"),
        (lambda x: rankfast.topk_merge(x, x, 2), TypeError, "indices: expected integer ids"),
    ],
)
def test_bad_input_raises_naming_the_argument(backend, call, error, match):
    if backend == "cuda":
        pytest.skip("argument checks do not depend on the device")
    x = np.random.default_rng(10).random((2, 10)).astype(np.float32)
    with pytest.raises(error, match=match):
        call(x)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(topk_module, "_C", None)
    monkeypatch.setattr(topk_module, "_fallback_warned", False)
    x = np.random.default_rng(11).random((2, 10)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="torch fallback"):
        rankfast.topk(x, 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankfast.topk(x, 3)


@pytest.mark.skipif(os.environ.get("RANKFAST_SKIP_EXT") == "1", reason="pure-Python install requested")
def test_extension_is_loaded():
    # CI installs with the extension; a silent fallback there would hide a broken build.
    assert rankfast.extension_available(), topk_module._EXT_ERROR
    from rankfast import _C

    assert _C.kMaxRowLength == 2**32 - 1
