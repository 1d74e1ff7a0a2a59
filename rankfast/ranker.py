"""`Ranker`: a saved model directory as a thread-safe object that serving stacks embed.

A model directory holds what scoring needs besides the model:

- ``config.json`` + ``model.safetensors``: the model (:meth:`RankingModel.save`);
- ``mappings.json``: raw user and item ids in contiguous order
  (:meth:`Interactions.save_mappings`);
- ``users.safetensors``: each user's training items (CSR ``seen_indptr`` /
  ``seen_items``, for ``exclude_seen``) and, for models that read histories,
  their last items (``history`` / ``lengths``);
- ``ranker.json``: the format version, ``max_history``, the text encoder's
  directory (relative, if the model was trained through one) and where the
  training data came from (``rankfast evaluate`` reads it back).

Only the first two are required, so a directory written by ``model.save`` or
by ``fit(checkpoint_dir=...)`` loads too: without mappings raw ids are the
contiguous ids, without ``users.safetensors`` nothing counts as seen.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import rankfast
from rankfast.scoring import score
from rankfast.data import MAPPINGS_FILE, IdMap, Interactions, user_histories
from rankfast.encoders import pool_history
from rankfast.models import RankingModel, Representation, load_model

__all__ = ["Ranker", "Request", "ModelDirError", "save_model_dir", "RANKER_FILE", "USERS_FILE"]

RANKER_FILE = "ranker.json"
USERS_FILE = "users.safetensors"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or corrupted; the message says which file and why."""


# --- writing --------------------------------------------------------------------------------


def save_model_dir(
    directory,
    model: RankingModel,
    train: Interactions,
    *,
    max_history: int = 50,
    encoder: str | os.PathLike | None = None,
    data: Mapping | None = None,
) -> str:
    """Writes everything :meth:`Ranker.load` reads into ``directory``, atomically.

    The files are written into a temporary directory beside ``directory``,
    flushed to disk, and the directory is then renamed into place, so a failure
    at any point leaves the old directory or none, never a half-written one. An
    existing directory is swapped with the new one in one atomic step where the
    system allows it (Linux), so the path always holds a complete model
    directory; elsewhere it is moved aside for the rename, a moment without a
    directory at the path. ``train`` supplies the id mappings, each user's
    seen items and histories. ``encoder``: a saved text encoder directory,
    copied in as ``encoder/``. ``data``: a JSON-able description of the
    training data (e.g. ``{"movielens": path}``). Returns the directory.
    """
    if (model.config.num_users, model.config.num_items) != (train.num_users, train.num_items):
        raise ValueError(
            f"train: has {train.num_users} users and {train.num_items} items, the model "
            f"{model.config.num_users} and {model.config.num_items}"
        )
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_temp_dir(parent, os.path.basename(directory))
    try:
        model.save(tmp)
        train.save_mappings(tmp)
        indptr, items = train.user_items()
        tensors = {"seen_indptr": torch.from_numpy(indptr), "seen_items": torch.from_numpy(items)}
        if model.uses_history:
            history, lengths = user_histories(train, max_history)
            tensors.update(history=torch.from_numpy(history), lengths=torch.from_numpy(lengths))
        save_file(tensors, os.path.join(tmp, USERS_FILE))
        if encoder is not None:
            shutil.copytree(encoder, os.path.join(tmp, "encoder"))
        meta = {
            "format": FORMAT_VERSION,
            "rankfast_version": rankfast.__version__,
            "max_history": int(max_history),
            "encoder": None if encoder is None else "encoder",
            "data": None if data is None else dict(data),
        }
        with open(os.path.join(tmp, RANKER_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        _fsync(tmp)
        _replace_dir(tmp, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _fsync(path: str):
    """Flushes a file, or a directory with every file below it, to disk: without it a crash
    soon after the rename can leave the renamed directory holding empty or partial files."""
    paths = [path]
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            paths += [os.path.join(root, name) for name in (*files, *dirs)]
    for name in reversed(paths):  # files before the directories that list them
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_temp_dir(parent: str, name: str) -> str:
    """A new empty directory ``parent/.name.<random>.tmp`` made with the umask's permissions
    (``tempfile.mkdtemp`` makes it 0700, so the renamed model directory would be unreadable
    to a server running as another user)."""
    for _ in range(100):
        path = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: cannot create a temporary directory for {name}")


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), b)


def _replace_dir(src: str, dst: str):
    """Renames ``src`` to ``dst``. An existing ``dst`` is swapped with ``src`` atomically
    where :func:`_exchange` can, else moved aside first; either way it is removed after."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # now the old directory
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".old", dir=os.path.dirname(dst))
    os.rename(dst, os.path.join(old, "previous"))
    try:
        os.rename(src, dst)
    except BaseException:
        # Put the old directory back; if even that fails it stays in ``old``, never deleted.
        os.rename(os.path.join(old, "previous"), dst)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


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

    def __init__(self, model: RankingModel, user_ids: IdMap, item_ids: IdMap, users: dict, meta: dict, *, directory=None, cold_start=False):
        self.model = model.eval()
        self.user_ids, self.item_ids = user_ids, item_ids
        self._users = users
        self.meta = meta
        self.directory = directory
        self.cold_start = cold_start

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, directory, *, device: str | torch.device = "cpu", cold_start: bool = False) -> Ranker:
        """Reads a model directory (see the module docstring).

        ``cold_start``: what :meth:`score` does with user ids the model has
        never seen. ``False``: raise ``KeyError`` naming the id. ``True``:
        score them from their history (the ``histories`` argument; none
        means an empty one) where the model can: a model whose users are
        feature vectors as wide as its item features (e.g. text vectors)
        gets the mean of the history items' vectors (:func:`rankfast.encoders.pool_history`).
        Other models raise ``ValueError`` on an unknown id.

        Raises :class:`ModelDirError` for a missing directory or a missing,
        unreadable or inconsistent file.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ModelDirError(f"{directory}: no such model directory")
        try:
            model = load_model(directory, device)
        except (OSError, ValueError) as err:
            raise ModelDirError(f"{directory}: cannot load the model: {err}") from err
        meta = _read_json(os.path.join(directory, RANKER_FILE), default={})
        cfg = model.config
        if os.path.exists(os.path.join(directory, MAPPINGS_FILE)):
            try:
                user_ids, item_ids = Interactions.load_mappings(directory)
            except (ValueError, TypeError, KeyError) as err:
                raise ModelDirError(f"{os.path.join(directory, MAPPINGS_FILE)}: not readable mappings ({err})") from err
        else:
            user_ids, item_ids = IdMap(np.arange(cfg.num_users)), IdMap(np.arange(cfg.num_items))
        if (len(user_ids), len(item_ids)) != (cfg.num_users, cfg.num_items):
            raise ModelDirError(
                f"{directory}: {MAPPINGS_FILE} maps {len(user_ids)} users and {len(item_ids)} items, "
                f"the model has {cfg.num_users} and {cfg.num_items}"
            )
        users = _read_users(os.path.join(directory, USERS_FILE), cfg.num_users, cfg.num_items)
        if model.uses_history and "history" not in users:
            raise ModelDirError(f"{directory}: {type(model).__name__} reads user histories, and there is no {USERS_FILE} with them")
        return cls(model, user_ids, item_ids, users, meta, directory=directory, cold_start=cold_start)

    @property
    def encoder_dir(self) -> str | None:
        """The text encoder the model was trained through (a directory), if any."""
        name = self.meta.get("encoder")
        return None if name is None or self.directory is None else os.path.join(self.directory, name)

    # --- scoring ------------------------------------------------------------------------

    def score(self, users, candidates=None, k: int = 10, exclude_seen: bool = True, *, histories: Mapping | None = None) -> list[dict]:
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
            for n, request in zip(members, batch):
                rows = ranked[start : start + len(request.users)]
                results[n] = [{"user": row["user"], "items": row["items"][: request.k], "scores": row["scores"][: request.k]} for row in rows]
                start += len(request.users)
        return results

    def _score_rows(self, users: list, histories: list, candidates, k: int, exclude_seen: bool) -> list[dict]:
        """Top ``k`` of each raw user id (``histories[j]``: cold-start history of ``users[j]`` or None)."""
        items = None if candidates is None else torch.from_numpy(self.item_ids.index(np.asarray(candidates), name="candidates"))
        known = np.isin(np.asarray(users), self.user_ids.raw) if users else np.zeros(0, dtype=bool)
        if not known.all() and not self.cold_start:
            unknown = np.asarray(users)[~known][0]
            raise KeyError(f"users: unknown user id {unknown.item()!r} (load the Ranker with cold_start=True to score new users)")
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
        if "seen_indptr" not in self._users:
            return None
        indptr, items = self._users["seen_indptr"], self._users["seen_items"]
        return [items[indptr[u] : indptr[u + 1]] for u in rows.tolist()]

    def _stored_history(self, rows: torch.Tensor):
        if not self.model.uses_history:
            return None, None
        return self._users["history"][rows], self._users["lengths"][rows]

    # --- cold start ---------------------------------------------------------------------

    def _score_cold(self, histories: list, items, k: int, exclude_seen: bool):
        """``(ids, scores)`` ``[len(histories), k]`` of unknown users from their histories."""
        item_repr = self.model.item_repr
        user_repr = self.model.user_repr
        if not (user_repr.uses_features and item_repr.uses_features and user_repr.features.shape[1] == item_repr.features.shape[1]):
            raise ValueError(
                f"users: unknown ids, and this {type(self.model).__name__} cannot score new users: "
                "cold start needs user features as wide as the item features (users as pooled item vectors)"
            )
        max_len = int(self.meta.get("max_history", 50))
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
        ids, scores = score(model, torch.arange(len(rows)), items, k=k, exclude=exclude, history=extra[0], lengths=extra[1])
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
        """Writes the model's pair scorer ``(users, items[, history, lengths]) -> scores``
        (contiguous ids, aligned pairs, any number of pairs) as a
        ``torch.export`` program to ``path`` (``.pt2``), atomically.

        Load it with ``torch.export.load(path).module()``. Raises
        ``RuntimeError`` when ``torch.export`` cannot trace the model.
        """
        model = self.model
        pairs = torch.export.Dim("pairs", min=1)
        args = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        shapes = [{0: pairs}, {0: pairs}]
        if model.uses_history:
            args += [torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 1])]
            shapes += [{0: pairs, 1: torch.export.Dim("history", min=1)}, {0: pairs}]
        device = next(model.parameters()).device
        try:
            program = torch.export.export(model, tuple(a.to(device) for a in args), dynamic_shapes=tuple(shapes))
        except Exception as err:  # torch.export raises many types; all mean "cannot trace"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"export: torch.export cannot trace this {type(model).__name__} ({first})") from err
        path = os.fspath(path)
        head, tail = os.path.split(path)
        tmp = os.path.join(head, f".{tail}.tmp.pt2")  # torch.export.save wants the .pt2 suffix
        try:
            torch.export.save(program, tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(head or ".")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


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


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return meta


def _read_users(path: str, num_users: int, num_items: int) -> dict:
    """The per-user tensors of ``users.safetensors``, checked against the model's sizes ({} if absent)."""
    if not os.path.exists(path):
        return {}
    try:
        users = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ModelDirError(f"{path}: not a readable safetensors file ({err})") from err
    indptr, items = users.get("seen_indptr"), users.get("seen_items")
    ok = indptr is not None and items is not None and indptr.shape == (num_users + 1,)
    ok = ok and int(indptr[0]) == 0 and int(indptr[-1]) == len(items) and bool((indptr[1:] >= indptr[:-1]).all())
    ok = ok and (not len(items) or (0 <= int(items.min()) and int(items.max()) < num_items))
    if "history" in users:
        ok = ok and users["history"].shape[0] == num_users and users.get("lengths", torch.empty(0)).shape == (num_users,)
    if not ok:
        raise ModelDirError(f"{path}: seen items or histories do not fit a model of {num_users} users and {num_items} items")
    return users
