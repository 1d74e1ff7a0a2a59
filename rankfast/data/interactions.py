"""The interactions container and the raw-id <-> contiguous-id mappings."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from rankfast._io import atomic_file
from rankfast.data.fields import Features

__all__ = ["IdMap", "Interactions", "MAPPINGS_FILE"]

MAPPINGS_FILE = "mappings.json"


def _as_numpy(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if hasattr(x, "to_numpy"):  # pandas Series
        return x.to_numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # e.g. ragged lists
        raise TypeError(f"{name}: cannot be read as a 1-D array ({err})") from None


class IdMap:
    """A bijection between raw ids (ints or strings) and ``0..n-1``.

    Raw ids are held sorted, so contiguous ids do not depend on the order in
    which a log lists them, and lookups are a binary search.
    """

    def __init__(self, raw_ids):
        raw = _as_numpy(raw_ids, "raw_ids")
        if raw.ndim != 1:
            raise ValueError(f"raw_ids: expected a 1-D sequence, got shape {raw.shape}")
        if raw.dtype == object:
            raise TypeError("raw_ids: ids must be all integers or all strings")
        if len(raw) > 1 and not np.all(raw[1:] > raw[:-1]):
            raise ValueError("raw_ids: ids must be distinct and sorted (use IdMap.fit)")
        self._raw = raw

    @classmethod
    def fit(cls, values) -> IdMap:
        """The map of the distinct values of ``values``."""
        return cls(np.unique(_as_numpy(values, "values")))

    def __len__(self) -> int:
        return len(self._raw)

    def __eq__(self, other) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._raw, other._raw)

    @property
    def raw(self) -> np.ndarray:
        """Raw ids, indexed by contiguous id."""
        return self._raw

    def find(self, values) -> np.ndarray:
        """Contiguous ids (int64) of raw ids, ``-1`` for each one the map does not hold
        (whatever its type: ``None``, an int too large for int64 or a string among
        integer ids is not found, never an error)."""
        values = _as_numpy(values, "values").reshape(-1)
        if values.dtype == object:  # mixed types, or ints beyond int64: one at a time
            return np.array([self._find_one(v) for v in values.tolist()], dtype=np.int64)
        if not len(self._raw) or not len(values):
            return np.full(len(values), -1, dtype=np.int64)
        try:
            pos = np.minimum(np.searchsorted(self._raw, values), len(self._raw) - 1)
            found = self._raw[pos] == values
        except TypeError:  # e.g. strings against integer ids: nothing matches
            return np.full(len(values), -1, dtype=np.int64)
        return np.where(found, pos, -1).astype(np.int64)

    def _find_one(self, value) -> int:
        try:
            pos = min(int(np.searchsorted(self._raw, value)), len(self._raw) - 1)
            return pos if len(self._raw) and bool(self._raw[pos] == value) else -1
        except (TypeError, ValueError, OverflowError):
            return -1

    def index(self, values, *, name: str = "ids") -> np.ndarray:
        """Contiguous ids (int64) of raw ids; an unknown id raises ``KeyError`` naming it."""
        values = _as_numpy(values, name).reshape(-1)
        pos = self.find(values)
        unknown = np.flatnonzero(pos < 0)
        if unknown.size:
            raise KeyError(f"{name}: unknown raw id {values[unknown[:1]].tolist()[0]!r}")
        return pos

    def to_raw(self, index) -> np.ndarray:
        """Raw ids of contiguous ids."""
        index = np.asarray(_as_numpy(index, "index"), dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index: ids must lie in [0, {len(self)})")
        return self._raw[index]

    def to_list(self) -> list:
        return self._raw.tolist()


@dataclass(frozen=True, eq=False)
class Interactions:
    """An interaction log with contiguous user and item ids.

    ``users`` and ``items`` are int64 arrays of contiguous ids; ``ratings`` is
    an explicit rating or a 0/1 label (float32, optional); ``timestamps`` is
    int64 (optional). ``user_ids``/``item_ids`` map back to the raw ids, and
    ``item_text`` (optional) holds one string per contiguous item id for text
    encoders. Splits share the maps, so every part has the same id space.
    ``features`` (optional, :class:`rankfast.data.fields.Features`) holds the
    encoded feature fields: a row per user, per item and per interaction
    (context); subsets keep their interactions' context rows.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None
    timestamps: np.ndarray | None
    user_ids: IdMap
    item_ids: IdMap
    item_text: list[str] | None = None
    features: Features | None = None

    def __post_init__(self):
        n = len(self.users)
        for name in ("items", "ratings", "timestamps"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name}: length {len(value)} does not match users ({n})")
        for name, ids, size in (("users", self.users, len(self.user_ids)), ("items", self.items, len(self.item_ids))):
            if ids.size and (ids.min() < 0 or ids.max() >= size):
                raise ValueError(f"{name}: contiguous ids must lie in [0, {size})")
        if self.item_text is not None and len(self.item_text) != len(self.item_ids):
            raise ValueError(f"item_text: {len(self.item_text)} entries for {len(self.item_ids)} items")
        if self.features is not None:
            sizes = {"user": len(self.user_ids), "item": len(self.item_ids), "context": n}
            for side, size in sizes.items():
                if len(getattr(self.features, side)) != size:
                    raise ValueError(
                        f"features: the {side} table has {len(getattr(self.features, side))} rows for {size}"
                    )

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_raw(cls, users, items, ratings=None, timestamps=None, *, item_text=None, user_ids=None, item_ids=None):
        """Builds the container from raw ids (numpy, torch, lists or pandas columns).

        Args:
            users, items: raw ids, one per interaction.
            ratings: ratings or 0/1 labels, optional.
            timestamps: integer timestamps, optional.
            item_text: ``{raw item id: text}``; items missing from it get ``""``.
            user_ids, item_ids: existing maps to reuse (e.g. a test file in the
                id space of its training file); default: fitted on this data.
        """
        users = _as_numpy(users, "users").reshape(-1)
        items = _as_numpy(items, "items").reshape(-1)
        if len(items) != len(users):
            raise ValueError(f"items: length {len(items)} does not match users ({len(users)})")
        user_ids = IdMap.fit(users) if user_ids is None else user_ids
        item_ids = IdMap.fit(items) if item_ids is None else item_ids
        if ratings is not None:
            ratings = np.asarray(_as_numpy(ratings, "ratings"), dtype=np.float32).reshape(-1)
        if timestamps is not None:
            timestamps = np.asarray(_as_numpy(timestamps, "timestamps"), dtype=np.int64).reshape(-1)
        text = None
        if item_text is not None:
            text = [str(item_text.get(raw, "")) for raw in item_ids.to_list()]
        return cls(
            user_ids.index(users, name="users"),
            item_ids.index(items, name="items"),
            ratings,
            timestamps,
            user_ids,
            item_ids,
            text,
        )

    @classmethod
    def from_frame(cls, frame, *, user="user_id", item="item_id", rating=None, timestamp=None, **kwargs):
        """Builds the container from a pandas DataFrame (or any mapping of columns)."""
        columns = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
        available = list(frame.columns) if hasattr(frame, "columns") else list(frame.keys())
        for arg, col in columns.items():
            if col is not None and col not in available:
                raise KeyError(f"{arg}: column {col!r} not in the frame (columns: {available})")
        get = lambda col: None if col is None else frame[col]  # noqa: E731
        return cls.from_raw(get(user), get(item), get(rating), get(timestamp), **kwargs)

    # --- views ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def subset(self, index) -> Interactions:
        """The interactions at ``index`` (int positions or a boolean mask), same id maps."""
        index = np.asarray(index)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(
            self,
            users=self.users[index],
            items=self.items[index],
            ratings=pick(self.ratings),
            timestamps=pick(self.timestamps),
            features=None if self.features is None else self.features.subset(index),
        )

    def clicks(self, threshold: float) -> Interactions:
        """The same interactions with 0/1 labels: 1 where the rating is at least
        ``threshold`` (e.g. click = rating >= 4 on MovieLens), else 0."""
        if self.ratings is None:
            raise ValueError("data: clicks from ratings need ratings, and the interactions have none")
        return replace(self, ratings=(self.ratings >= float(threshold)).astype(np.float32))

    def chronological_order(self) -> np.ndarray:
        """Positions sorted by user, then timestamp, then item id (the tie rule)."""
        if self.timestamps is None:
            raise ValueError("data: ordering by time needs timestamps, and the interactions have none")
        return np.lexsort((self.items, self.timestamps, self.users))

    def user_items(self) -> tuple[np.ndarray, np.ndarray]:
        """Each user's distinct items as CSR ``(indptr, indices)``, indices sorted."""
        keys = np.unique(self.users * self.num_items + self.items)
        users, items = np.divmod(keys, self.num_items)
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=self.num_users), out=indptr[1:])
        return indptr, items.astype(np.int64)

    def item_counts(self) -> np.ndarray:
        """Interactions per item (int64, one entry per contiguous item id)."""
        return np.bincount(self.items, minlength=self.num_items).astype(np.int64)

    # --- persistence ----------------------------------------------------------------

    def save_mappings(self, directory) -> str:
        """Writes ``mappings.json`` (raw ids in contiguous order) into ``directory``,
        atomically; returns its path. One file of a model directory
        (:func:`rankfast.ranker.save_model_dir`)."""
        path = os.path.join(directory, MAPPINGS_FILE)
        payload = {"users": self.user_ids.to_list(), "items": self.item_ids.to_list()}
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
        return path

    @staticmethod
    def load_mappings(directory) -> tuple[IdMap, IdMap]:
        """``(user_ids, item_ids)`` saved by :meth:`save_mappings`."""
        path = os.path.join(directory, MAPPINGS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: no {MAPPINGS_FILE} in {directory}")
        with open(path, "rb") as f:
            return Interactions.mappings_from_json(f.read())

    @staticmethod
    def mappings_from_json(text: str | bytes) -> tuple[IdMap, IdMap]:
        """``(user_ids, item_ids)`` of the contents of a ``mappings.json``."""
        payload = json.loads(text)
        return IdMap(payload["users"]), IdMap(payload["items"])
