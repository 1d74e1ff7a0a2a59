"""`rankfast.score`: every (user, candidate) score, or each user's top K, in bounded memory."""

from __future__ import annotations

import contextlib
import numbers
import threading

import torch

from rankfast._ids import as_ids, check_history, check_k, exclude_csr
from rankfast.models.base import RankingModel
from rankfast.models.fields import check_context
from rankfast.scoring.plan import Plan, execution, fill, make_plan, tile_runner
from rankfast.scoring.positions import csr_rows, excluded_positions, positions_to_ids
from rankfast.scoring.protocol import Scorer
from rankfast.scoring.registry import select_scorer
from rankfast.selection import topk

__all__ = ["score", "DEFAULT_MEMORY_BUDGET"]

#: Default cap, in bytes, on what scoring holds besides the model and the returned scores.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def score(
    model: RankingModel,
    users,
    items=None,
    *,
    k: int | None = None,
    exclude=None,
    history=None,
    lengths=None,
    context=None,
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
            :func:`rankfast.topk`: NaN last, ties to the earlier candidate).
            ``k`` is clamped to the number of candidates ``N``; rows with
            fewer than ``min(k, N)`` eligible candidates (some excluded) are
            padded with id ``-1`` and score ``-inf``.
        exclude: with ``k``, item ids each user must not get back (e.g.
            already-seen items): a list of ``B`` id sequences or CSR
            ``(indptr, indices)``. Every candidate position holding an
            excluded id is skipped; excluded ids that are not candidates are
            ignored.
        history, lengths: the users' past items ``[B, L]`` (padded; padding
            values are ignored) and valid counts ``[B]``; required by models
            with ``uses_history`` (:class:`AttentionModel`, :class:`SASRec`), ignored by
            others.
        context: for models that read context fields (``model.uses_context``:
            :class:`FMModel`, :class:`DeepFM`, :class:`DCNv2`), each user's
            request context, the same for all its candidates: ``{field name:
            encoded values}``, one row per user (``[B]`` categorical rows,
            ``[B, max_len]`` bags padded with -1, ``[B, dim]`` numbers; encode raw
            values with ``field.encode``). ``None``: every context field at its
            out-of-vocabulary row (zeros for dense fields). Ignored by other models.
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
        ``(ids, scores)``, both ``[B, min(k, N)]``: int64 item ids, best first.

    The backend is picked in one place, :func:`rankfast.scoring.select_scorer`:
    CUDA models go through the fused Triton kernels (``rankfast.kernels``;
    with ``k``, score and top-K in one pass) when they cover the model, other
    models through the factorized path, and a model neither covers through
    its own forward. ``RANKFAST_BACKEND`` forces ``reference``,
    ``factorized`` or ``fused`` (alias ``triton``; on a CPU only under
    ``TRITON_INTERPRET=1``); a forced backend that does not cover the model
    is an error.
    """
    if not isinstance(model, RankingModel):
        raise TypeError(f"model: expected a rankfast.models.RankingModel, got {type(model).__name__}")
    param = next(model.parameters())
    device, dtype, cfg = param.device, param.dtype, model.config
    users = as_ids("users", users, device=device, high=cfg.num_users)
    num_users = users.shape[0]
    if items is None:
        items = torch.arange(cfg.num_items, device=device)
    else:
        items = as_ids("items", items, ndims=(1, 2), device=device, high=cfg.num_items)
        if items.dim() == 2 and items.shape[0] != num_users:
            raise ValueError(f"items: per-user candidates must be [B={num_users}, N], got {tuple(items.shape)}")
    history, lengths = _check_history(model, history, lengths, num_users, device)
    context = check_context(model.context_fields, context, num_users, device)
    if k is not None:
        k = check_k(k, items.shape[-1])
    if exclude is not None:
        if k is None:
            raise ValueError("exclude: only used with k (top-K results)")
        exclude = exclude_csr(exclude, num_users, cfg.num_items)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise TypeError(f"memory_budget: expected an int (bytes), got {type(memory_budget).__name__}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be >= 1 byte, got {memory_budget}")

    per_user, num_items = items.dim() == 2, items.shape[-1]
    scorer = select_scorer(model, device, history, lengths, shared=not per_user)
    tile_bytes, workers = execution(scorer, device, memory_budget)
    plan = make_plan(
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
    if k is None:
        out = torch.empty(num_users, num_items, dtype=dtype, device=device)
    else:
        out_ids = torch.empty(num_users, k, dtype=torch.int64, device=device)
        out = torch.empty(num_users, k, dtype=dtype, device=device)
        if exclude is not None and not per_user:
            exclude = excluded_positions(items, exclude)  # the same positions for every block
    with _eval_mode(model), torch.inference_mode(), tile_runner(plan.workers) as run:
        for start in range(0, num_users, plan.block_users):
            rows = slice(start, min(start + plan.block_users, num_users))
            block_args = [users[rows], *(None if t is None else t[rows] for t in (history, lengths))]
            if context is None:
                block = scorer(model, *block_args)
            else:  # only models that read context fields get it (their scorers take it)
                block = scorer(model, *block_args, context={name: v[rows] for name, v in context.items()})
            block_items = items[rows] if per_user else items
            if k is None:
                fill(block, block_items, out[rows], plan, run)
                continue
            skip = None
            if exclude is not None:
                skip = excluded_positions(block_items, csr_rows(exclude, rows)) if per_user else csr_rows(exclude, rows)
            out_ids[rows], out[rows] = _block_top_k(
                block, rows.stop - rows.start, block_items, k, skip, plan, run, dtype
            )
    return out if k is None else (out_ids, out)


def _block_top_k(block: Scorer, num_rows: int, candidates, k: int, skip, plan: Plan, run, dtype):
    """``(item ids, scores)`` ``[num_rows, k]`` of a block's users against ``candidates``
    (``[N]`` or ``[num_rows, N]``); ``skip``: CSR over the block's users of candidate
    positions to leave out.

    The scorer's fused score + top-K takes the block when it has one, ``k`` is within its
    limit, and the item-side terms of all the candidates fit one tile of the plan (it takes
    them at once); otherwise the block's scores are filled in and selected from."""
    n = candidates.shape[-1]
    fits = plan.chunk_items >= n and (candidates.dim() == 1 or plan.tile_users >= plan.block_users)
    if 0 < block.max_fused_k and k <= block.max_fused_k and fits:
        positions, values = block.topk(slice(0, num_rows), block.items(candidates), k, skip)
    else:
        scores = torch.empty(num_rows, n, dtype=dtype, device=candidates.device)
        fill(block, candidates, scores, plan, run)
        values, positions = topk(scores, k, exclude=skip)
    return positions_to_ids(positions, candidates), values


_eval_lock = threading.Lock()
_eval_calls: dict[int, tuple[int, list]] = {}  # id(model) -> (calls running, modes to restore)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode (dropout off) while any ``score`` call on it runs; the first
    call to start saves every submodule's mode and the last one to finish restores them
    (concurrent calls on a model in training mode would otherwise switch dropout back on
    under each other)."""
    key = id(model)
    with _eval_lock:
        calls, modes = _eval_calls.get(key, (0, None))
        if calls == 0:
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
        _eval_calls[key] = (calls + 1, modes)
    try:
        yield
    finally:
        with _eval_lock:
            calls, modes = _eval_calls.pop(key)
            if calls > 1:
                _eval_calls[key] = (calls - 1, modes)
            else:
                for m, training in modes:
                    m.training = training


def _check_history(model: RankingModel, history, lengths, num_users: int, device):
    """Validated ``(history, lengths)`` for models that read them; ``(None, None)`` for others."""
    if history is None and lengths is None:
        if model.uses_history:
            raise ValueError(f"history: {type(model).__name__} needs history [B, L] and lengths [B]")
        return None, None
    if history is None:
        raise ValueError("history: required when lengths is given")
    if lengths is None:
        raise ValueError("lengths: required when history is given")
    history, lengths = check_history(history, lengths, num_items=model.config.num_items, rows=num_users, device=device)
    return (history, lengths) if model.uses_history else (None, None)
