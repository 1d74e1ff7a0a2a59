"""`rankfast.score`: every (user, candidate) score, or each user's top K, in bounded memory.

The module is `scoring` so that the package attribute `rankfast.score` is the function.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankfast.models.attention import history_mask
from rankfast.models.base import RankingModel
from rankfast.models.factorized import Footprint, factorized_scorer
from rankfast.selection import _check_k, _exclude_csr, topk

__all__ = ["score", "DEFAULT_MEMORY_BUDGET"]

#: Default cap, in bytes, on what scoring holds besides the model and the returned scores.
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: On a CPU the per-pair intermediates of one tile are kept near this size so
#: they stay in cache between the layers (tiles of 256 MiB measured 2-4x slower).
CPU_TILE_BYTES = 8 * 2**20

BACKEND_ENV = "RANKFAST_BACKEND"
#: ``auto``: fused Triton kernels for CUDA tensors (models they support), the
#: factorized path otherwise; ``reference``: the model's own forward;
#: ``factorized``: the factorized eager path on every device; ``triton``: the
#: fused kernels on every device (on a CPU only under ``TRITON_INTERPRET=1``).
BACKENDS = ("auto", "reference", "factorized", "triton")


def score(
    model: RankingModel,
    users,
    items=None,
    *,
    k: int | None = None,
    exclude=None,
    history=None,
    lengths=None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
):
    """Scores users against candidate items with ``model``.

    Args:
        model: a :class:`rankfast.models.RankingModel`. It runs in eval mode
            (dropout off) under ``torch.inference_mode``; its train/eval mode
            is restored afterwards. Inputs move to the model's device.
        users: user ids ``[B]`` (tensor, numpy array or list).
        items: candidate item ids: ``None`` (every item), one shared set
            ``[N]``, or one set per user ``[B, N]``.
        k: return each user's top ``k`` instead of all scores (through
            :func:`rankfast.topk`: NaN last, ties to the earlier candidate,
            rows with fewer than ``k`` eligible candidates padded with id
            ``-1`` and score ``-inf``).
        exclude: with ``k``, item ids each user must not get back (e.g.
            already-seen items): a list of ``B`` id sequences or CSR
            ``(indptr, indices)``. Every candidate position holding an
            excluded id is skipped; excluded ids that are not candidates are
            ignored.
        history, lengths: the users' past items ``[B, L]`` (padded; padding
            values are ignored) and valid counts ``[B]``; required by models
            with ``uses_history`` (:class:`AttentionModel`), ignored by others.
        memory_budget: bytes the scoring may hold besides the model and the
            returned scores; candidates (and users, if needed) are processed
            in chunks that fit.

    On a CPU, tiles run on ``torch.get_num_threads()`` worker threads, each
    doing single-threaded torch ops (measured 4-15x faster than intra-op
    threads when another process shares the cores). While a call runs,
    torch's intra-op thread count is therefore 1 for the whole process; the
    last concurrent call to finish restores it.

    Returns:
        Scores ``[B, N]`` in the model's dtype, or with ``k`` the pair
        ``(ids, scores)``, both ``[B, k]``: int64 item ids, best first.

    The implementation is picked in one place by device (see
    :func:`_select_scorer`): CUDA tensors go through the fused Triton kernels
    (``rankfast.kernels``; with ``k``, score and top-K in one pass) when they
    cover the model, otherwise the factorized path. ``RANKFAST_BACKEND``
    overrides: ``reference`` (the model's own forward, chunked the same way),
    ``factorized``, or ``triton`` (the kernels on any device; an error for a
    model they do not cover).
    """
    if not isinstance(model, RankingModel):
        raise TypeError(f"model: expected a rankfast.models.RankingModel, got {type(model).__name__}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cfg = model.config

    users = _as_ids("users", users, device, ndims=(1,), high=cfg.num_users)
    num_users = users.shape[0]
    if items is None:
        items = torch.arange(cfg.num_items, device=device)
    else:
        items = _as_ids("items", items, device, ndims=(1, 2), high=cfg.num_items)
        if items.dim() == 2 and items.shape[0] != num_users:
            raise ValueError(f"items: per-user candidates must be [B={num_users}, N], got {tuple(items.shape)}")
    per_user = items.dim() == 2
    history, lengths = _check_history(model, history, lengths, num_users, device)
    if k is not None:
        k = _check_k(k)
    if exclude is not None:
        if k is None:
            raise ValueError("exclude: only used with k (top-K results)")
        exclude = _exclude_csr(exclude, num_users, cfg.num_items, one_row=False)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise TypeError(f"memory_budget: expected an int (bytes), got {type(memory_budget).__name__}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")

    scorer, tile_bytes, workers = _select_scorer(model, device, memory_budget)
    num_items = items.shape[-1]
    plan = _plan(
        scorer.footprint(model, 0 if history is None else history.shape[1]),
        num_users,
        num_items,
        per_user=per_user,
        top_k=k is not None,
        itemsize=param.element_size(),
        budget=memory_budget,
        tile_bytes=tile_bytes,
        workers=workers,
    )

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(), _tile_runner(workers) as run:
            if k is None:
                out = torch.empty(num_users, num_items, dtype=dtype, device=device)
            else:
                out_ids = torch.empty(num_users, k, dtype=torch.int64, device=device)
                out = torch.empty(num_users, k, dtype=dtype, device=device)
                if exclude is not None and not per_user:
                    exclude = _shared_positions(items.cpu(), *exclude)
            for start in range(0, num_users, plan.block_users):
                rows = slice(start, min(start + plan.block_users, num_users))
                block_scorer = scorer(
                    model,
                    users[rows],
                    None if history is None else history[rows],
                    None if lengths is None else lengths[rows],
                )
                block_items = items[rows] if per_user else items
                if k is None:
                    _fill(block_scorer, block_items, out[rows], plan, run)
                    continue
                skip = None
                if exclude is not None and per_user:
                    skip = _per_user_positions(block_items.cpu(), exclude, rows, cfg.num_items)
                elif exclude is not None:
                    skip = _csr_rows(exclude, rows)
                if _fuses_top_k(block_scorer, plan, k, num_items, per_user):
                    num_rows = rows.stop - rows.start
                    out_ids[rows], out[rows] = _fused_top_k(block_scorer, block_items, k, skip, num_rows)
                    continue
                buf = torch.empty(rows.stop - rows.start, num_items, dtype=dtype, device=device)
                _fill(block_scorer, block_items, buf, plan, run)
                out_ids[rows], out[rows] = _top_k(buf, block_items, k, skip)
    finally:
        for m, training in modes:
            m.training = training
    return out if k is None else (out_ids, out)


# --- dispatch ----------------------------------------------------------------------------


def _backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKENDS}, got {backend!r}")
    return backend


def _select_scorer(model: RankingModel, device: torch.device, memory_budget: int):
    """The one dispatch point: which implementation scores, the tile size in
    bytes it works in, and how many tiles run at once (one per CPU thread)."""
    backend = _backend()
    if backend == "reference":
        scorer = ReferenceScorer
    elif backend == "factorized" or (backend == "auto" and device.type != "cuda"):
        scorer = factorized_scorer(model)
    else:
        scorer = _fused_scorer(model, required=backend == "triton")
        if scorer is None:  # auto: a model (or build) the fused kernels do not cover
            scorer = factorized_scorer(model)
    if device.type != "cpu":
        return scorer, memory_budget, 1
    # Triton kernels reach a CPU only under the interpreter, which is not thread-safe.
    workers = 1 if backend == "triton" else torch.get_num_threads()
    return scorer, min(memory_budget, CPU_TILE_BYTES), workers


def trains_fused(model: RankingModel) -> bool:
    """The same dispatch for training: whether :func:`rankfast.fit` computes
    ``model``'s scores through the fused forward and backward kernels (no
    per-pair activations stored). Only with ``RANKFAST_BACKEND=triton`` for now
    (an error if the kernels cannot run the model, or it has dropout, which the
    kernels lack): on an H200 a training step through them measured 0.44-0.59x
    eager PyTorch (``bench/results/2026-11-29-nvidia-h200.md``), so by default
    training runs the model's own forward, on every device, until the backward
    kernels are faster."""
    if _backend() != "triton":
        return False
    _fused_scorer(model, required=True)
    if model.config.dropout > 0:
        raise ValueError(f"{BACKEND_ENV}=triton: the fused kernels have no dropout, and this model's "
                         f"dropout is {model.config.dropout}")
    return True


def _fused_scorer(model: RankingModel, *, required: bool):
    """The fused Triton scorer for ``model`` (``rankfast.kernels.scorers``), or None when Triton
    is missing or the kernels do not cover the model (an error instead with ``required``)."""
    try:
        from rankfast.kernels.scorers import fused_scorer
    except ImportError as err:
        if required:
            raise ValueError(f"{BACKEND_ENV}=triton: the fused kernels cannot be imported ({err})") from err
        return None
    scorer = fused_scorer(model)
    if scorer is None and required:
        raise ValueError(f"{BACKEND_ENV}=triton: no fused kernel covers this {type(model).__name__} ({model.config})")
    return scorer


def _fuses_top_k(scorer, plan, k, num_items, per_user) -> bool:
    """Whether the block's top-K comes from the scorer's fused score + top-K: it has one, k is
    within its limit, and the item-side terms of all the block's candidates fit in one tile of
    the plan (the fused kernel takes them at once)."""
    if getattr(scorer, "topk", None) is None:
        return False
    from rankfast.kernels.topk import MAX_K

    fits = plan.chunk_items >= num_items and (not per_user or plan.tile_users >= plan.block_users)
    return k <= MAX_K and fits


def _fused_top_k(scorer, candidates, k, skip, num_rows):
    """``(item ids, scores)`` ``[U, k]`` of the scorer's ``num_rows`` users from its fused score +
    top-K; ``skip`` is the CSR of excluded candidate positions (or None)."""
    from rankfast.kernels.scorers import positions_bitmask

    n = candidates.shape[-1]
    state = scorer.items(candidates)
    mask = None
    if skip is not None:
        mask = positions_bitmask(skip[0], skip[1], num_rows, n, candidates.device)
    positions, values = scorer.topk(slice(0, num_rows), state, k, mask)
    lookup = torch.cat([candidates.expand(num_rows, -1), candidates.new_full((num_rows, 1), -1)], dim=1)
    return lookup.gather(1, positions.masked_fill(positions < 0, n)), values


class ReferenceScorer:
    """The model's own forward over every (user, candidate) pair of a tile,
    expanded to aligned pairs (``RANKFAST_BACKEND=reference``)."""

    def __init__(self, model: RankingModel, users, history=None, lengths=None):
        self.model, self.users, self.history, self.lengths = model, users, history, lengths

    def items(self, ids):
        return ids

    def pairs(self, rows: slice, ids):
        users = self.users[rows]
        t, n = users.shape[0], ids.shape[-1]
        history = lengths = None
        if self.history is not None:
            history = self.history[rows, None].expand(t, n, -1).reshape(t * n, -1)
            lengths = self.lengths[rows, None].expand(t, n).reshape(-1)
        pair_users = users[:, None].expand(t, n).reshape(-1)
        return self.model(pair_users, ids.expand(t, n).reshape(-1), history, lengths).view(t, n)

    @staticmethod
    def footprint(model: RankingModel, history_len: int) -> Footprint:
        # Every layer's input and output per pair, once per history item: an
        # overestimate for attention's output MLP, which runs once per pair.
        widths = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        per_item = widths + 4 * model.config.dim
        return Footprint(user=history_len, item=1, pair=(history_len + 1) * per_item)


# --- chunking ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    block_users: int  # users whose user-side terms (and, with k, score rows) are held at once
    chunk_items: int  # candidates whose item-side terms are computed at once
    tile_users: int  # users scored together against one chunk of candidates
    workers: int  # tiles (and chunks' item-side terms) in flight at once


def _plan(fp: Footprint, num_users, num_items, *, per_user, top_k, itemsize, budget, tile_bytes, workers) -> _Plan:
    # Per-user candidates have no shared item-side terms: they are per pair.
    pair_bytes = (fp.pair + (fp.item if per_user else 0)) * itemsize
    tile_pairs = max(1, tile_bytes // pair_bytes)
    chunk_items = max(1, min(num_items, tile_pairs))
    tile_users = max(1, min(num_users, tile_pairs // chunk_items))
    # With k each user's row of scores is held until its top-K is taken (plus,
    # for per-user candidates with exclusions, int64 keys and a mask per entry).
    row_bytes = fp.user * itemsize + (num_items * (itemsize + 9) if top_k else 0)
    in_flight = tile_users * chunk_items * pair_bytes + (0 if per_user else chunk_items * (fp.item + fp.table) * itemsize)
    spare = budget - workers * in_flight
    block_users = max(tile_users, min(num_users, spare // max(1, row_bytes)))
    return _Plan(block_users=block_users, chunk_items=chunk_items, tile_users=tile_users, workers=workers)


def _fill(scorer, items, out, plan: _Plan, run):
    """Writes the scores of the scorer's users against ``items`` (``[N]`` or
    ``[U, N]``) into ``out [U, N]``, ``plan.workers`` chunks of candidates at a time."""
    num_users, num_items = out.shape
    shared = items.dim() == 1
    chunks = [slice(s, s + plan.chunk_items) for s in range(0, num_items, plan.chunk_items)]
    user_tiles = [slice(s, s + plan.tile_users) for s in range(0, num_users, plan.tile_users)]

    def tile(job):
        cols, rows, state = job
        if state is None:
            state = scorer.items(items[rows, cols])
        out[rows, cols] = scorer.pairs(rows, state)

    for first in range(0, len(chunks), plan.workers):
        group = chunks[first : first + plan.workers]
        states = run(lambda cols: scorer.items(items[cols]), group) if shared else [None] * len(group)
        run(tile, [(cols, rows, state) for cols, state in zip(group, states) for rows in user_tiles])
        del states  # before the next group's are computed: the plan holds one group at a time


def _top_k(scores, candidates, k, skip):
    """Each row's top ``k`` of ``scores [U, N]`` as ``(item ids, scores)``;
    ``candidates`` ``[N]`` or ``[U, N]`` map positions to ids, padding stays -1."""
    values, positions = topk(scores, k, exclude=skip)
    rows, n = scores.shape
    lookup = torch.cat([candidates.expand(rows, -1), candidates.new_full((rows, 1), -1)], dim=1)
    return lookup.gather(1, positions.masked_fill(positions < 0, n)), values


# --- CPU worker threads -------------------------------------------------------------------

_threads_lock = threading.Lock()
_threads_saved = 0
_threads_users = 0  # score calls running tiles on workers right now


@contextlib.contextmanager
def _tile_runner(workers: int):
    """Yields ``run(fn, jobs) -> [fn(job), ...]``, on ``workers`` threads if more than one.

    Each worker runs torch ops single-threaded on its own tile: no
    synchronization between threads per op, which on a busy machine (another
    process holding a core) made 2-thread intra-op scoring 10x slower. While
    any call runs workers, torch's intra-op thread count is 1 for the process;
    the last one to finish restores it.
    """
    if workers == 1:
        yield lambda fn, jobs: [fn(job) for job in jobs]
        return
    global _threads_saved, _threads_users
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="rankfast-score") as pool:

            def in_inference_mode(fn):  # grad mode is per thread
                def call(job):
                    with torch.inference_mode():
                        return fn(job)

                return call

            yield lambda fn, jobs: list(pool.map(in_inference_mode(fn), jobs))
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


# --- argument handling -------------------------------------------------------------------


def _as_ids(name, value, device, *, ndims, high=None):
    """Integer ids as an int64 tensor on ``device``; checked against ``[0, high)`` unless ``high`` is None."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, (np.ndarray, list, tuple, range)):
        try:
            arr = np.asarray(value)
        except ValueError as err:
            raise ValueError(f"{name}: not a rectangular array of ids ({err})") from err
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)  # np.asarray([]) is float64
        if arr.dtype == object:
            raise TypeError(f"{name}: expected integer ids")
        t = torch.from_numpy(arr)
    else:
        raise TypeError(f"{name}: expected a tensor, numpy array or list of ids, got {type(value).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer ids, got {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected {want}, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if high is not None and t.numel():
        bad = t[(t < 0) | (t >= high)]
        if bad.numel():
            raise ValueError(f"{name}: id {int(bad[0])} out of range [0, {high})")
    return t


def _check_history(model, history, lengths, num_users, device):
    """Validated ``(history, lengths)``; ``(None, None)`` for models that do not use them."""
    if history is None and lengths is None:
        if model.uses_history:
            raise ValueError(f"history: {type(model).__name__} needs history [B, L] and lengths [B]")
        return None, None
    if history is None:
        raise ValueError("history: required when lengths is given")
    if lengths is None:
        raise ValueError("lengths: required when history is given")
    history = _as_ids("history", history, device, ndims=(2,))
    lengths = _as_ids("lengths", lengths, device, ndims=(1,))
    if history.shape[0] != num_users:
        raise ValueError(f"history: expected one row per user [B={num_users}, L], got {tuple(history.shape)}")
    if lengths.shape[0] != num_users:
        raise ValueError(f"lengths: expected [B={num_users}], got {tuple(lengths.shape)}")
    max_len = history.shape[1]
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise ValueError(f"lengths: each must lie in [0, L={max_len}], got range [{int(lengths.min())}, {int(lengths.max())}]")
    valid = history[history_mask(lengths, max_len)]
    bad = valid[(valid < 0) | (valid >= model.config.num_items)]
    if bad.numel():
        raise ValueError(f"history: item id {int(bad[0])} out of range [0, {model.config.num_items})")
    if not model.uses_history:
        return None, None
    return history, lengths


def _shared_positions(items, indptr, ids):
    """Excluded item ids (CSR over users) -> the positions in the shared
    candidate set ``items [N]`` that hold them (all of them, if repeated)."""
    sorted_ids, order = torch.sort(items, stable=True)
    lo = torch.searchsorted(sorted_ids, ids, right=False)
    counts = torch.searchsorted(sorted_ids, ids, right=True) - lo
    ends = torch.cumsum(counts, 0)
    offsets = torch.arange(int(ends[-1]) if ends.numel() else 0) - torch.repeat_interleave(ends - counts, counts)
    positions = order[torch.repeat_interleave(lo, counts) + offsets]
    new_indptr = torch.cat([ends.new_zeros(1), ends])[indptr]
    return new_indptr, positions


def _csr_rows(csr, rows: slice):
    """Rows ``rows`` of a CSR ``(indptr, indices)``, re-based to start at 0."""
    indptr, ids = csr
    part = indptr[rows.start : rows.stop + 1]
    return part - part[0], ids[int(part[0]) : int(part[-1])]


def _per_user_positions(items, exclude, rows: slice, num_items):
    """Positions in per-user candidates ``items [U, N]`` (users ``rows``) whose id is excluded for that user."""
    indptr, ids = _csr_rows(exclude, rows)
    num = items.shape[0]
    row_of = torch.repeat_interleave(torch.arange(num), indptr[1:] - indptr[:-1])
    user_offset = torch.arange(num).unsqueeze(1) * num_items
    mask = torch.isin(items + user_offset, row_of * num_items + ids)
    new_indptr = torch.cat([indptr.new_zeros(1), torch.cumsum(mask.sum(1), 0)])
    return new_indptr, mask.nonzero()[:, 1]
