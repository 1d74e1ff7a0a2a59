"""`Ranker`: a saved model directory as a thread-safe object that serving stacks embed.

The model directory's format, writer and reader live in :mod:`rankfast.model_dir`;
:func:`save_model_dir` and :class:`ModelDirError` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from rankfast._io import atomic_file
from rankfast.data import IdMap
from rankfast.encoders import pool_history
from rankfast.model_dir import RANKER_FILE, USERS_FILE, ModelDirError, read_model_dir, save_model_dir
from rankfast.models import RankingModel, Representation
from rankfast.models.fields import default_context
from rankfast.request import Limits, Request, check_flag, shown
from rankfast.scoring import score

__all__ = ["Ranker", "Request", "Limits", "ModelDirError", "save_model_dir", "RANKER_FILE", "USERS_FILE"]


@dataclass(frozen=True)
class _Checked:
    """A request checked against a Ranker: ``rows`` are the users' contiguous ids (-1 for a
    cold-start user), ``items`` the distinct candidates' (None: every item), ``k`` clamped
    to the candidates, ``context`` the users' encoded context rows (None for a model
    without context fields)."""

    users: list
    rows: np.ndarray
    histories: Mapping | None
    items: np.ndarray | None
    k: int
    exclude_seen: bool
    context: dict | None

    @property
    def group(self) -> tuple:
        """Requests with the same group are scored in one call, none inflating another's cost."""
        return (None if self.items is None else self.items.tobytes(), self.exclude_seen, self.k)


class Ranker:
    """Scores raw user ids against raw item ids with a saved model.

    Holds the model, the id maps and the users' seen items, all read-only
    after :meth:`load`: no per-request state, so one instance serves many
    threads at once (each call's result equals a serial call's). Every
    score goes through :func:`rankfast.score`.
    """

    def __init__(
        self,
        model: RankingModel,
        user_ids: IdMap,
        item_ids: IdMap,
        users: dict,
        meta: dict,
        *,
        directory=None,
        cold_start=False,
        limits: Limits | None = None,
    ):
        self.model = model.eval()
        self.user_ids, self.item_ids = user_ids, item_ids
        self._users = users
        self.meta = meta
        self.directory = directory
        self.cold_start = cold_start
        self.limits = Limits() if limits is None else limits

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        directory,
        *,
        device: str | torch.device = "cpu",
        cold_start: bool = False,
        limits: Limits | None = None,
    ) -> Ranker:
        """Reads a model directory (:mod:`rankfast.model_dir`; written by
        :func:`save_model_dir` or ``fit(checkpoint_dir=...)``), one save's files
        even while another save replaces it.

        ``cold_start``: what :meth:`score` does with user ids the model has
        never seen. ``False``: raise ``KeyError`` naming the id. ``True``:
        score them from their history (the ``histories`` argument; none
        means an empty one) where the model can: a model whose users are
        feature vectors as wide as its item features (e.g. text vectors)
        gets the mean of the history items' vectors (:func:`rankfast.encoders.pool_history`).
        Other models raise ``ValueError`` on an unknown id.

        ``limits``: what one request may ask (:class:`rankfast.request.Limits`:
        ``max_k``, ``max_users``, ``max_candidates``; default none); a request
        over a limit raises ``ValueError`` naming it, before any scoring.

        Raises :class:`ModelDirError` for a missing directory or a missing,
        unreadable or inconsistent file (a plain ``model.save`` directory
        lacks ``mappings.json`` and the rest: it is not a model directory).
        """
        parts = read_model_dir(directory, device)
        return cls(
            parts.model,
            parts.user_ids,
            parts.item_ids,
            parts.users,
            parts.meta,
            directory=os.fspath(directory),
            cold_start=cold_start,
            limits=limits,
        )

    @property
    def encoder_dir(self) -> str | None:
        """The text encoder the model was trained through (a directory), if any."""
        name = self.meta.get("encoder")
        return None if name is None or self.directory is None else os.path.join(self.directory, name)

    # --- scoring ------------------------------------------------------------------------

    def score(
        self,
        users,
        candidates=None,
        k: int = 10,
        exclude_seen: bool = True,
        *,
        histories: Mapping | None = None,
        context: Mapping | None = None,
    ) -> list[dict]:
        """Each user's top ``k`` items, best first.

        Args:
            users: raw user ids.
            candidates: raw item ids to rank, shared by all users (default:
                every item); a repeated id counts once.
            k: items per user (a positive int); fewer come back when fewer
                candidates are eligible.
            exclude_seen: ``True`` or ``False``: leave out each user's training
                items (for a cold-start user, the items of its history).
            histories: ``{raw user id: [raw item ids, oldest first]}`` for
                cold-start users (see :meth:`load`).
            context: for a model that reads context fields (``model.uses_context``),
                the request's raw context, the same for every user of the call:
                ``{field name: value}`` (a category, a list of categories for a
                multi-valued field, numbers for a dense one), encoded with the
                vocabularies saved with the model: an unknown category reads the
                out-of-vocabulary row. None: every context field unknown.
                Ignored by other models.

        Returns:
            One ``{"user": id, "items": [ids], "scores": [floats]}`` per user, in order.

        Raises ``KeyError`` for an unknown user or candidate id, ``TypeError``
        for an argument of the wrong type (a bool or ``None`` as an id, say)
        and ``ValueError`` for a bad ``k`` or a request over the limits.
        """
        return self.score_many([Request(users, candidates, k, exclude_seen, histories, context)])[0]

    def score_many(self, requests: Iterable[Request | Mapping], *, return_errors: bool = False) -> list:
        """The results of many :meth:`score` calls (``Request`` objects or dicts
        of its arguments), in order.

        Every request is checked (its arguments, ids and the limits) before any
        is scored. A bad one raises; with ``return_errors=True`` its exception
        takes its place in the results instead and the others are answered,
        and a request whose scoring fails (e.g. ``MemoryError``) fails alone
        too. Requests with the same candidates, ``exclude_seen`` and ``k``
        (clamped to the candidates) are scored together in one
        :func:`rankfast.score` call, so many small requests cost about as much
        as one large one, and no request is scored at another's ``k``. A score
        may differ from a separate call's in the last bit (another batch shape
        rounds differently); the thread safety promise is about equal calls.
        """
        results: list = []
        checked: dict[int, _Checked] = {}
        for n, request in enumerate(requests):
            results.append(None)
            try:
                checked[n] = self._check(request)
            except Exception as err:  # with return_errors, whatever a request's check raises is its answer
                if not return_errors:
                    raise
                results[n] = err
        groups: dict[tuple, list[int]] = {}
        for n, request in checked.items():
            groups.setdefault(request.group, []).append(n)
        for members in groups.values():
            try:
                answers = self._score_group([checked[n] for n in members])
            except Exception as err:
                if not return_errors:
                    raise
                answers = [err] if len(members) == 1 else [self._score_alone(checked[n]) for n in members]
            for n, answer in zip(members, answers, strict=True):
                results[n] = answer
        return results

    def _score_alone(self, request: _Checked):
        """One request's rows, or the exception its scoring raised (it failed in a group)."""
        try:
            return self._score_group([request])[0]
        except Exception as err:
            return err

    def _check(self, request) -> _Checked:
        """``request`` checked against the limits and id maps, before any scoring."""
        request = Request.of(request)
        users = self.limits.check_ids("users", request.users)
        k = self.limits.check_k(request.k)
        exclude_seen = check_flag("exclude_seen", request.exclude_seen)
        items = None
        if request.candidates is not None:
            raw = self.limits.check_ids("candidates", request.candidates)
            items = self.item_ids.find(np.asarray(raw))
            if (items < 0).any():
                raise KeyError(f"candidates: unknown raw id {shown(raw[int(np.argmax(items < 0))])}")
            _, first = np.unique(items, return_index=True)
            items = items[np.sort(first)]  # each candidate once, in the order given (ties go to the earlier)
        if request.histories is not None and not isinstance(request.histories, Mapping):
            raise TypeError(
                f"histories: expected a mapping of user id to items, got {type(request.histories).__name__}"
            )
        rows = self.user_ids.find(np.asarray(users))
        if (rows < 0).any() and not self.cold_start:
            raise KeyError(
                f"users: unknown user id {shown(users[int(np.argmax(rows < 0))])} "
                "(load the Ranker with cold_start=True to score new users)"
            )
        k = min(k, len(self.item_ids) if items is None else len(items))
        context = self._context(request.context, len(users))
        return _Checked(users, rows, request.histories, items, k, exclude_seen, context)

    def _context(self, raw, num_users: int) -> dict | None:
        """A request's raw context encoded as one row per user (None for a model without
        context fields; a field the request does not give reads the out-of-vocabulary row)."""
        fields = self.model.context_fields
        if not fields:
            return None
        if raw is not None and not isinstance(raw, Mapping):
            raise TypeError(f"context: expected a mapping of field name to value, got {type(raw).__name__}")
        raw = {} if raw is None else raw
        unknown = sorted(set(raw) - {f.name for f in fields})
        if unknown:
            raise ValueError(
                f"context: {unknown} are not context fields of the model (it reads {sorted(f.name for f in fields)})"
            )
        rows = default_context(fields, num_users, "cpu")
        for f in fields:
            if f.name in raw:
                value = raw[f.name]
                if f.kind == "dense":
                    values = np.tile(np.asarray(value, dtype=np.float32), (num_users, 1))
                else:
                    values = [value] * num_users
                rows[f.name] = torch.from_numpy(f.encode(values, lambda j: "context"))
        return rows

    def _score_group(self, batch: list[_Checked]) -> list[list[dict]]:
        """The rows of checked requests of one group, scored together."""
        first = batch[0]
        users = [u for request in batch for u in request.users]
        rows = np.concatenate([request.rows for request in batch])
        histories = [(request.histories or {}).get(u) for request in batch for u in request.users]
        context = None
        if first.context is not None:
            context = {name: torch.cat([request.context[name] for request in batch]) for name in first.context}
        ids, scores = self._top_k(rows, histories, first.items, first.k, first.exclude_seen, context)
        ranked = [self._row(user, ids[j], scores[j]) for j, user in enumerate(users)]
        bounds = np.cumsum([0, *(len(request.users) for request in batch)])
        return [ranked[start:stop] for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]

    def _top_k(self, rows: np.ndarray, histories: list, items, k: int, exclude_seen: bool, context=None):
        """``(ids, scores)`` ``[len(rows), k]`` (``k`` at most the candidates) of contiguous user
        ids ``rows``; a row of -1 is a cold-start user scored from ``histories[j]``; ``context``:
        each row's encoded context (None without context fields)."""
        items = None if items is None else torch.from_numpy(items)
        ids = np.full((len(rows), k), -1, dtype=np.int64)
        scores = np.full((len(rows), k), -np.inf, dtype=np.float64)
        known = rows >= 0
        if known.any():
            users = torch.from_numpy(rows[known])
            history, lengths = self._stored_history(users)
            exclude = self._seen(users) if exclude_seen else None
            known_context = None if context is None else {n: v[torch.from_numpy(known)] for n, v in context.items()}
            got_ids, got_scores = score(
                self.model, users, items, k=k, exclude=exclude, history=history, lengths=lengths, context=known_context
            )
            ids[known], scores[known] = got_ids.cpu().numpy(), got_scores.cpu().numpy()
        if not known.all():
            cold = np.flatnonzero(~known)
            ids[cold], scores[cold] = self._score_cold([histories[j] for j in cold], items, k, exclude_seen)
        return ids, scores

    def _row(self, user, ids: np.ndarray, scores: np.ndarray) -> dict:
        valid = ids >= 0  # rows with fewer eligible candidates than k are padded with -1
        return {"user": user, "items": self.item_ids.to_raw(ids[valid]).tolist(), "scores": scores[valid].tolist()}

    def _seen(self, rows: torch.Tensor) -> list:
        indptr, items = self._users["seen_indptr"], self._users["seen_items"]
        return [items[indptr[u] : indptr[u + 1]] for u in rows.tolist()]

    def _stored_history(self, rows: torch.Tensor):
        if not self.model.uses_history:
            return None, None
        return self._users["history"][rows], self._users["lengths"][rows]

    # --- explanations -------------------------------------------------------------------

    def explain(self, user, item, top: int = 5) -> list[dict]:
        """The history items that weighed most in ``user``'s score of ``item``.

        For a model that pools the user's history with attention (it has
        ``history_weights(users, items, history, lengths) -> [B, L]``, as
        :class:`~rankfast.models.AttentionModel` and :class:`~rankfast.models.SASRec`
        do): the weight each item of the user's stored history gets in the pooled
        history for this candidate (the softmax over the history, or DIN's raw
        weights with ``normalize=False``; SASRec's last block's attention from the
        last item read; an item that appears several times gets the sum).

        Returns up to ``top`` ``{"item": raw id, "weight": float}``, largest
        weight first (ties: the more recent item first); fewer when the
        history is shorter. Raises ``KeyError`` for an unknown user or item
        and ``TypeError`` for a model without attention over a history.
        """
        return self.explain_items(user, [item], top)[0]

    def explain_items(self, user, items, top: int = 5) -> list[list[dict]]:
        """:meth:`explain` of each of ``items`` (raw ids) for one ``user``, in one model call."""
        if not hasattr(self.model, "history_weights"):
            raise TypeError(
                f"explain: this {type(self.model).__name__} does not weigh history items "
                "(models with history_weights do: AttentionModel, SASRec)"
            )
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise ValueError(f"top: expected a positive int, got {top!r}")
        if user not in self.user_ids.raw:
            raise KeyError(f"user: unknown user id {user!r}")
        row = torch.from_numpy(self.user_ids.index(np.asarray([user]), name="user"))
        candidates = torch.from_numpy(self.item_ids.index(np.asarray(_as_list(items, "items")), name="items"))
        history, lengths = self._stored_history(row)
        n, valid = len(candidates), int(lengths[0])
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            weights = self.model.history_weights(
                *(t.to(device) for t in (row.expand(n), candidates, history.expand(n, -1), lengths.expand(n)))
            )
        recent_first = history[0, :valid].flip(0)
        return [self._top_items(w[:valid].flip(0).double().cpu(), recent_first, top) for w in weights]

    def _top_items(self, weights: torch.Tensor, history: torch.Tensor, top: int) -> list[dict]:
        """``weights`` of ``history`` slots (most recent first), summed per item; the ``top`` largest."""
        ids, column = torch.unique(history, return_inverse=True)
        totals = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, column, weights)
        latest = torch.full((len(ids),), len(history), dtype=torch.int64).scatter_reduce_(
            0, column, torch.arange(len(history)), reduce="amin"
        )
        order = sorted(range(len(ids)), key=lambda j: (-float(totals[j]), int(latest[j])))[:top]
        raw = self.item_ids.to_raw(ids[order].numpy()).tolist()
        return [{"item": item, "weight": float(totals[j])} for item, j in zip(raw, order, strict=True)]

    # --- cold start ---------------------------------------------------------------------

    def _score_cold(self, histories: list, items, k: int, exclude_seen: bool):
        """``(ids, scores)`` ``[len(histories), k]`` of unknown users from their histories."""
        item_repr = self.model.item_repr
        user_repr = self.model.user_repr
        if not (
            user_repr.uses_features
            and item_repr.uses_features
            and user_repr.features.shape[1] == item_repr.features.shape[1]
        ):
            raise ValueError(
                f"users: unknown ids, and this {type(self.model).__name__} cannot score new users: "
                "cold start needs user features as wide as the item features (users as pooled item vectors)"
            )
        max_len = self.meta["max_history"]
        rows = [self._history_rows(h)[-max_len:] for h in histories]
        history = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), dtype=torch.int64)
        for j, r in enumerate(rows):
            history[j, : len(r)] = torch.from_numpy(r)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        device = item_repr.features.device
        history, lengths = history.to(device), lengths.to(device)
        vectors = pool_history(item_repr.features, history, lengths)
        model = _with_users(self.model, vectors)
        exclude = rows if exclude_seen else None
        extra = (history, lengths) if model.uses_history else (None, None)
        ids, scores = score(
            model, torch.arange(len(rows)), items, k=k, exclude=exclude, history=extra[0], lengths=extra[1]
        )
        return ids.cpu().numpy(), scores.float().cpu().numpy()

    def _history_rows(self, history) -> np.ndarray:
        """Contiguous ids of a cold-start history of raw item ids (None: empty)."""
        values = np.asarray([] if history is None else _as_list(history, "histories"))
        if not values.size:
            return np.zeros(0, dtype=np.int64)
        # No cast to the raw ids' dtype: it would truncate longer strings (and floats) into other, known ids.
        return self.item_ids.index(values, name="histories")

    # --- export -------------------------------------------------------------------------

    def export(self, path) -> str:
        """Writes the model's pair scorer over raw ids as a ``torch.export``
        program to ``path`` (``.pt2``), atomically.

        Like :meth:`score` it takes raw ids: ``program(users, items[, history,
        lengths])``, int64 tensors of raw user and item ids of aligned pairs
        (any number), and for models that read histories each pair's history
        ``[pairs, L]`` of raw item ids (the first ``lengths`` of a row count).
        It returns the model's score of each pair, NaN where the user, the
        item or a counted history item is unknown (NaN ranks last). Load it
        with ``torch.export.load(path).module()``.

        Raises ``TypeError`` when the raw ids are not integers (e.g. strings)
        and ``RuntimeError`` when ``torch.export`` cannot trace the model.
        """
        for side, ids in (("user", self.user_ids), ("item", self.item_ids)):
            if ids.raw.dtype.kind not in "iu":
                raise TypeError(
                    f"export: the program takes integer ids, and this model's {side} ids are {ids.raw.dtype}"
                )
        model = self.model
        device = next(model.parameters()).device
        scorer = _RawIdScorer(model, self.user_ids, self.item_ids).to(device)
        pairs = torch.export.Dim("pairs", min=1)
        args = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        shapes = [{0: pairs}, {0: pairs}]
        if model.uses_history:
            args += [torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 1])]
            shapes += [{0: pairs, 1: torch.export.Dim("history", min=1)}, {0: pairs}]
        try:
            program = torch.export.export(scorer, tuple(a.to(device) for a in args), dynamic_shapes=tuple(shapes))
        except Exception as err:  # torch.export raises many types; all mean "cannot trace"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"export: torch.export cannot trace this {type(model).__name__} ({first})") from err
        with atomic_file(path) as tmp:
            torch.export.save(program, tmp)
        return os.fspath(path)


class _RawIdScorer(torch.nn.Module):
    """``model``'s pair scorer over raw integer ids, looked up in the sorted raw ids."""

    def __init__(self, model: RankingModel, user_ids: IdMap, item_ids: IdMap):
        super().__init__()
        self.model = model
        self.register_buffer("user_raw", torch.from_numpy(user_ids.raw.astype(np.int64)))
        self.register_buffer("item_raw", torch.from_numpy(item_ids.raw.astype(np.int64)))

    def forward(self, users, items, history=None, lengths=None):
        users, known = _lookup(self.user_raw, users)
        items, known_items = _lookup(self.item_raw, items)
        known = known & known_items
        if history is not None:
            history, known_history = _lookup(self.item_raw, history)
            counted = torch.arange(history.shape[1], device=history.device) < lengths[:, None]
            known = known & (known_history | ~counted).all(dim=1)
        scores = self.model(users, items, history, lengths)
        return scores.masked_fill(~known, float("nan"))


def _lookup(raw: torch.Tensor, ids: torch.Tensor):
    """``(contiguous ids, known)`` of raw ``ids``; unknown ones map to 0."""
    pos = torch.searchsorted(raw, ids).clamp(max=len(raw) - 1)
    known = raw[pos] == ids
    return torch.where(known, pos, 0), known


# --- helpers --------------------------------------------------------------------------------


def _with_users(model: RankingModel, vectors: torch.Tensor) -> RankingModel:
    """A model for ``len(vectors)`` new users represented by ``vectors``, sharing
    every weight with ``model`` (which is not modified); per-user parameters
    outside the representation (e.g. a user bias) start at zero."""
    n = len(vectors)
    config = dataclasses.replace(model.config, num_users=n)
    item_features = model.item_repr.features
    with torch.device("meta"):
        new = type(model)(config, user_features=vectors.to("meta"), item_features=item_features.to("meta"))
    for name, child in model.named_children():
        setattr(new, name, child)
    with torch.device(item_features.device):  # a hybrid's ID part is created on the model's device
        user_repr = Representation(n, model.user_repr.dim, vectors.to(item_features), hybrid=model.config.user_hybrid)
    user_repr.projection = model.user_repr.projection
    new.user_repr = user_repr
    for name, param in model.named_parameters(recurse=False):
        per_user = name.startswith("user") and param.shape[:1] == (model.config.num_users,)
        setattr(new, name, torch.nn.Parameter(param.new_zeros(n, *param.shape[1:])) if per_user else param)
    if any(t.is_meta for t in (*new.parameters(), *new.buffers())):
        raise ValueError(f"users: cold start does not cover {type(model).__name__}'s per-user weights")
    return new.eval()


def _as_list(values, name) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a sequence of ids, got {type(values).__name__}")
    return list(values.tolist() if isinstance(values, (np.ndarray, torch.Tensor)) else values)
