"""How a request is cut to fit a memory budget, and how its tiles run.

A request of B users x N candidates is scored in blocks of users (whose
user-side terms, and with ``k`` whose rows of scores, are held at once),
chunks of candidates (whose item-side terms are computed at once) and tiles
of users x a chunk (one :meth:`Scorer.pairs` call). On a CPU, tiles are kept
small enough to stay in cache and run on worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rankfast.scoring.protocol import Footprint, Scorer

__all__ = ["CPU_TILE_BYTES", "Plan", "execution", "make_plan", "fill", "tile_runner"]

#: On a CPU the per-pair intermediates of one tile are kept near this size so
#: they stay in cache between the layers (tiles of 256 MiB measured 2-4x slower).
CPU_TILE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Plan:
    block_users: int  # users whose user-side terms (and, with k, score rows) are held at once
    chunk_items: int  # candidates whose item-side terms are computed at once
    tile_users: int  # users scored together against one chunk of candidates
    workers: int  # tiles (and chunks' item-side terms) in flight at once


def execution(scorer: type[Scorer], device: torch.device, budget: int) -> tuple[int, int]:
    """``(tile_bytes, workers)``: on a CPU, tiles of about :data:`CPU_TILE_BYTES` run on
    ``torch.get_num_threads()`` workers (one, for a scorer that is not thread-safe);
    on other devices one tile may take the whole budget."""
    if device.type != "cpu":
        return budget, 1
    return min(budget, CPU_TILE_BYTES), torch.get_num_threads() if scorer.thread_safe else 1


def make_plan(
    fp: Footprint,
    num_users: int,
    num_items: int,
    *,
    per_user: bool,
    top_k: bool,
    itemsize: int,
    budget: int,
    tile_bytes: int,
    workers: int,
) -> Plan:
    """Blocks, chunks and tiles for ``num_users`` x ``num_items`` pairs within ``budget`` bytes,
    for a scorer holding ``fp`` and ``workers`` tiles of about ``tile_bytes`` in flight."""
    # Per-user candidates have no shared item-side terms: they are per pair.
    pair_bytes = (fp.pair + (fp.item if per_user else 0)) * itemsize
    tile_pairs = max(1, tile_bytes // pair_bytes)
    chunk_items = max(1, min(num_items, tile_pairs))
    tile_users = max(1, min(num_users, tile_pairs // chunk_items))
    # With k each user's row of scores is held until its top-K is taken (plus,
    # for per-user candidates with exclusions, int64 keys and a mask per entry).
    row_bytes = fp.user * itemsize + (num_items * (itemsize + 9) if top_k else 0)
    in_flight = tile_users * chunk_items * pair_bytes + (
        0 if per_user else chunk_items * (fp.item + fp.table) * itemsize
    )
    spare = budget - workers * in_flight
    block_users = max(tile_users, min(num_users, spare // max(1, row_bytes)))
    return Plan(block_users=block_users, chunk_items=chunk_items, tile_users=tile_users, workers=workers)


def fill(scorer: Scorer, items: torch.Tensor, out: torch.Tensor, plan: Plan, run) -> None:
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
        run(tile, [(cols, rows, state) for cols, state in zip(group, states, strict=True) for rows in user_tiles])
        del states  # before the next group's are computed: the plan holds one group at a time


_threads_lock = threading.Lock()
_threads_saved = 0
_threads_users = 0  # score calls running tiles on workers right now


@contextlib.contextmanager
def tile_runner(workers: int):
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
