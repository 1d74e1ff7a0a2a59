"""`Ranker`: a saved model directory as a thread-safe object that serving stacks embed.

The model directory's format, writer and reader live in :mod:`rankfast.model_dir`;
:func:`save_model_dir` and :class:`ModelDirError` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rankfast._io import atomic_file
from rankfast.data import IdMap
from rankfast.encoders import pool_history
from rankfast.model_dir import RANKER_FILE, USERS_FILE, ModelDirError, read_model_dir, save_model_dir
from rankfast.models import RankingModel, Representation
from rankfast.scoring import score

__all__ = ["Ranker", "Request", "ModelDirError", "save_model_dir", "RANKER_FILE", "USERS_FILE"]


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One call's worth of :meth:`Ranker.score` arguments, for :meth:`Ranker.score_many`."""

    users: Sequence
    candidates: Sequence | None = None
    k: int = 10
    exclude_seen: bool = True
    histories: Mapping | None = None


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
    ):
        self.model = model.eval()
        self.user_ids, self.item_ids = user_ids, item_ids
        self._users = users
        self.meta = meta
        self.directory = directory
        self.cold_start = cold_start

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, directory, *, device: str | torch.device = "cpu", cold_start: bool = False) -> Ranker:
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
        )

    @property
    def encoder_dir(self) -> str | None:
        """The text encoder the model was trained through (a directory), if any."""
        name = self.meta.get("encoder")
        return None if name is None or self.directory is None else os.path.join(self.directory, name)

    # --- scoring ------------------------------------------------------------------------

    def score(
        self, users, candidates=None, k: int = 10, exclude_seen: bool = True, *, histories: Mapping | None = None
    ) -> list[dict]:
        """Each user's top ``k`` items, best first.

        Args:
            users: raw user ids.
            candidates: raw item ids to rank, shared by all users (default:
                every item).
            k: items per user; fewer come back when fewer are eligible.
            exclude_seen: leave out each user's training items (for a
                cold-start user, the items of its history).
            histories: ``{raw user id: [raw item ids, oldest first]}`` for
                cold-start users (see :meth:`load`).

        Returns:
            One ``{"user": id, "items": [ids], "scores": [floats]}`` per user, in order.
        """
        return self.score_many([Request(users, candidates, k, exclude_seen, histories)])[0]

    def score_many(self, requests: Iterable[Request | Mapping]) -> list[list[dict]]:
        """The results of many :meth:`score` calls (``Request`` objects or dicts
        of its arguments), in order. Requests with the same candidates and
        ``exclude_seen`` are scored together in one :func:`rankfast.score`
        call (with the largest ``k``; each request keeps its own top ``k``),
        so many small requests cost about as much as one large one. A score
        may differ from a separate call's in the last bit (another batch shape
        rounds differently); the thread safety promise is about equal calls."""
        requests = [r if isinstance(r, Request) else Request(**r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for n, request in enumerate(requests):
            if isinstance(request.k, bool) or not isinstance(request.k, (int, np.integer)) or request.k < 1:
                raise ValueError(f"k: expected a positive int, got {request.k!r}")
            key = (None if request.candidates is None else tuple(request.candidates), bool(request.exclude_seen))
            groups.setdefault(key, []).append(n)
        results: list = [None] * len(requests)
        for (candidates, exclude_seen), members in groups.items():
            batch = [requests[n] for n in members]
            users = [u for r in batch for u in _as_list(r.users, "users")]
            histories = [(r.histories or {}).get(u) for r in batch for u in _as_list(r.users, "users")]
            ranked = self._score_rows(users, histories, candidates, max(r.k for r in batch), exclude_seen)
            start = 0
            for n, request in zip(members, batch, strict=True):
                rows = ranked[start : start + len(request.users)]
                results[n] = [
                    {"user": row["user"], "items": row["items"][: request.k], "scores": row["scores"][: request.k]}
                    for row in rows
                ]
                start += len(request.users)
        return results

    def _score_rows(self, users: list, histories: list, candidates, k: int, exclude_seen: bool) -> list[dict]:
        """Top ``k`` of each raw user id (``histories[j]``: cold-start history of ``users[j]`` or None)."""
        items = (
            None
            if candidates is None
            else torch.from_numpy(self.item_ids.index(np.asarray(candidates), name="candidates"))
        )
        known = np.isin(np.asarray(users), self.user_ids.raw) if users else np.zeros(0, dtype=bool)
        if not known.all() and not self.cold_start:
            unknown = np.asarray(users)[~known][0]
            raise KeyError(
                f"users: unknown user id {unknown.item()!r} (load the Ranker with cold_start=True to score new users)"
            )
        ids = np.full((len(users), k), -1, dtype=np.int64)
        scores = np.full((len(users), k), -np.inf, dtype=np.float64)
        if known.any():
            rows = torch.from_numpy(self.user_ids.index(np.asarray(users)[known], name="users"))
            history, lengths = self._stored_history(rows)
            exclude = self._seen(rows) if exclude_seen else None
            got_ids, got_scores = score(self.model, rows, items, k=k, exclude=exclude, history=history, lengths=lengths)
            ids[known], scores[known] = got_ids.cpu().numpy(), got_scores.cpu().numpy()
        if not known.all():
            cold = np.flatnonzero(~known)
            ids[cold], scores[cold] = self._score_cold([histories[j] for j in cold], items, k, exclude_seen)
        return [self._row(user, ids[j], scores[j]) for j, user in enumerate(users)]

    def _row(self, user, ids: np.ndarray, scores: np.ndarray) -> dict:
        valid = ids >= 0  # rows with fewer than k eligible candidates are padded with -1
        user = user.item() if isinstance(user, np.generic) else user
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
        :class:`~rankfast.models.AttentionModel` does): the weight each item of
        the user's stored history gets in the pooled history for this
        candidate (the softmax over the history, or DIN's raw weights with
        ``normalize=False``; an item that appears several times gets the sum).

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
                "(models with history_weights do, e.g. AttentionModel)"
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
