"""Readers for MovieLens, NCF split files and generic CSV/Parquet tables.

Every text reader goes through :func:`_read_records`, which reports a
malformed line as ``DataFormatError("path:line: what is wrong")``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from rankfast.data.interactions import IdMap, Interactions

__all__ = ["DataFormatError", "NCFData", "load_movielens", "load_ncf", "load_table"]

# ml-100k's u.item genre flags, in file order (u.genre lists the same names).
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names file and line."""


def _read_records(
    path, *, sep, fields, encoding="utf-8", header=None, min_fields=None
) -> Iterator[tuple[int, list[str]]]:
    """Yields ``(line number, fields)`` for each non-empty line.

    ``sep=","`` parses quoted CSV; other separators split plainly. ``header``
    (a list of names) must match the first line if given. ``fields`` is the
    exact number of fields, or with ``min_fields`` the minimum.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path} does not exist")
    with open(path, encoding=encoding, newline="") as f:
        lines = csv.reader(f) if sep == "," else (line.rstrip("\r\n").split(sep) for line in f)
        lines = tqdm(lines, desc=os.path.basename(path), unit=" lines", leave=False, mininterval=1.0, disable=None)
        for lineno, parts in enumerate(lines, start=1):
            if not parts or parts == [""]:
                continue
            if header is not None and lineno == 1:
                if parts[: len(header)] != list(header):
                    raise DataFormatError(f"{path}:1: expected header {','.join(header)}, got {','.join(parts)}")
                continue
            ok = len(parts) >= min_fields if min_fields is not None else len(parts) == fields
            if not ok:
                expected = f"at least {min_fields}" if min_fields is not None else str(fields)
                raise DataFormatError(
                    f"{path}:{lineno}: expected {expected} fields separated by {sep!r}, got {len(parts)}"
                )
            yield lineno, parts


def _convert(path, lineno, value, kind: Callable, what: str):
    try:
        return kind(value)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {what} {value!r} is not a valid {kind.__name__}") from None


def _read_ratings(path, *, sep, encoding="utf-8", header=None):
    """Reads ``user, item, rating, timestamp`` lines into four numpy columns."""
    users, items, ratings, stamps = [], [], [], []
    for lineno, (u, i, r, t) in _read_records(path, sep=sep, fields=4, encoding=encoding, header=header):
        users.append(_convert(path, lineno, u, int, "user id"))
        items.append(_convert(path, lineno, i, int, "item id"))
        ratings.append(_convert(path, lineno, r, float, "rating"))
        stamps.append(_convert(path, lineno, t, int, "timestamp"))
    return (
        np.array(users, dtype=np.int64),
        np.array(items, dtype=np.int64),
        np.array(ratings, dtype=np.float32),
        np.array(stamps, dtype=np.int64),
    )


def _item_text(title: str, genres: list[str]) -> str:
    genres = [g for g in genres if g and g != "(no genres listed)"]
    return f"{title}. Genres: {', '.join(genres)}" if genres else title


def load_movielens(path) -> Interactions:
    """Loads a MovieLens directory: ml-100k, ml-1m, ml-10m, ml-latest or ml-latest-small.

    The format is detected from the files present (``u.data``, ``ratings.dat``
    or ``ratings.csv``). Items are those that appear in the ratings; their
    ``item_text`` is ``"<title>. Genres: <g1>, <g2>"`` from the movie file.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    join = lambda name: os.path.join(path, name)  # noqa: E731
    text = {}
    if os.path.exists(join("u.data")):
        ratings = _read_ratings(join("u.data"), sep="\t")
        if os.path.exists(join("u.item")):
            for lineno, parts in _read_records(
                join("u.item"), sep="|", fields=5 + len(_ML100K_GENRES), encoding="latin-1"
            ):
                flags = [_convert(join("u.item"), lineno, v, int, "genre flag") for v in parts[5:]]
                genres = [g for g, on in zip(_ML100K_GENRES, flags, strict=True) if on]
                text[_convert(join("u.item"), lineno, parts[0], int, "movie id")] = _item_text(parts[1], genres)
    elif os.path.exists(join("ratings.dat")):
        ratings = _read_ratings(join("ratings.dat"), sep="::", encoding="latin-1")
        if os.path.exists(join("movies.dat")):
            for lineno, (mid, title, genres) in _read_records(
                join("movies.dat"), sep="::", fields=3, encoding="latin-1"
            ):
                text[_convert(join("movies.dat"), lineno, mid, int, "movie id")] = _item_text(title, genres.split("|"))
    elif os.path.exists(join("ratings.csv")):
        ratings = _read_ratings(join("ratings.csv"), sep=",", header=["userId", "movieId", "rating", "timestamp"])
        if os.path.exists(join("movies.csv")):
            records = _read_records(join("movies.csv"), sep=",", fields=3, header=["movieId", "title", "genres"])
            for lineno, (mid, title, genres) in records:
                text[_convert(join("movies.csv"), lineno, mid, int, "movie id")] = _item_text(title, genres.split("|"))
    else:
        raise FileNotFoundError(f"path: {path} has none of u.data, ratings.dat, ratings.csv")
    return Interactions.from_raw(*ratings, item_text=text or None)


@dataclass(frozen=True)
class NCFData:
    """The NCF benchmark files: ``train``/``test`` share id maps; ``negatives[j]``
    are the sampled negative item ids (contiguous) of ``test`` row ``j``."""

    train: Interactions
    test: Interactions
    negatives: np.ndarray


def load_ncf(prefix) -> NCFData:
    """Loads ``<prefix>.train.rating``, ``<prefix>.test.rating`` and
    ``<prefix>.test.negative`` (e.g. ``prefix="Data/ml-1m"``).

    ``.rating`` lines are ``user\\titem\\trating\\ttimestamp`` or, as NCF's own
    loader reads them, ``user\\titem\\trating`` (no timestamps then);
    ``.negative`` lines are ``(user,item)\\tneg1\\tneg2...``, in the order of the test file.
    """
    train_path, test_path, neg_path = (f"{prefix}.{s}" for s in ("train.rating", "test.rating", "test.negative"))
    train = _read_ncf_ratings(train_path)
    test = _read_ncf_ratings(test_path)
    negatives = []
    for lineno, parts in _read_records(neg_path, sep="\t", fields=None, min_fields=2):
        pair = parts[0].strip("()").split(",")
        if len(pair) != 2 or not parts[0].startswith("(") or not parts[0].endswith(")"):
            raise DataFormatError(f"{neg_path}:{lineno}: expected '(user,item)' first, got {parts[0]!r}")
        user, item = (_convert(neg_path, lineno, v, int, "id") for v in pair)
        row = len(negatives)
        if row >= len(test[0]) or (user, item) != (test[0][row], test[1][row]):
            raise DataFormatError(
                f"{neg_path}:{lineno}: pair ({user},{item}) does not match line {row + 1} of {test_path}"
            )
        negatives.append([_convert(neg_path, lineno, v, int, "negative item id") for v in parts[1:]])
    if len(negatives) != len(test[0]):
        raise DataFormatError(f"{neg_path}: {len(negatives)} lines for {len(test[0])} test interactions")
    if len({len(n) for n in negatives}) > 1:
        raise DataFormatError(f"{neg_path}: lines have different numbers of negatives")
    negatives = np.array(negatives, dtype=np.int64).reshape(len(negatives), -1)
    user_ids = IdMap.fit(np.concatenate([train[0], test[0]]))
    item_ids = IdMap.fit(np.concatenate([train[1], test[1], negatives.reshape(-1)]))
    maps = {"user_ids": user_ids, "item_ids": item_ids}
    return NCFData(
        Interactions.from_raw(*train, **maps),
        Interactions.from_raw(*test, **maps),
        item_ids.index(negatives, name="negatives").reshape(negatives.shape),
    )


def _read_ncf_ratings(path):
    """``(users, items, ratings, timestamps)`` of ``user\\titem\\trating[\\ttimestamp]`` lines
    (timestamps None when the file has three fields a line, all lines alike)."""
    records = list(_read_records(path, sep="\t", fields=None, min_fields=3))
    width = len(records[0][1]) if records else 3
    for lineno, parts in records:
        if len(parts) != width or width > 4:
            raise DataFormatError(
                f"{path}:{lineno}: expected {min(width, 4)} fields separated by '\\t', got {len(parts)}"
            )
    kinds = ((int, "user id", np.int64), (int, "item id", np.int64), (float, "rating", np.float32))
    kinds += ((int, "timestamp", np.int64),) if width == 4 else ()
    columns = [
        np.array([_convert(path, lineno, parts[j], kind, what) for lineno, parts in records], dtype=dtype)
        for j, (kind, what, dtype) in enumerate(kinds)
    ]
    return (*columns, None) if width == 3 else tuple(columns)


def load_table(path, *, user="user_id", item="item_id", rating=None, timestamp=None, sep=",") -> Interactions:
    """Loads any CSV (with a header line) or Parquet file, given its column names.

    Ids that are all integers are kept as integers, otherwise as strings.
    ``rating`` and ``timestamp`` columns are optional. Parquet needs pyarrow.
    """
    columns = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    wanted = {arg: col for arg, col in columns.items() if col is not None}
    if str(path).endswith((".parquet", ".pq")):
        data = _read_parquet(path, wanted)
    else:
        data = _read_csv_columns(path, wanted, sep)
    return Interactions.from_raw(data["user"], data["item"], data.get("rating"), data.get("timestamp"))


def _read_parquet(path, wanted):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("load_table: reading Parquet needs pyarrow (pip install pyarrow)") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path} does not exist")
    names = pq.read_schema(path).names
    for arg, col in wanted.items():
        if col not in names:
            raise KeyError(f"{arg}: column {col!r} not in {path} (columns: {names})")
    table = pq.read_table(path, columns=list(wanted.values()))
    out = {}
    for arg, col in wanted.items():
        column = table.column(col)
        if column.null_count:
            raise DataFormatError(f"{path}: column {col!r} has {column.null_count} missing values")
        out[arg] = column.to_numpy()
    return out


def _read_csv_columns(path, wanted, sep):
    records = _read_records(path, sep=sep, fields=None, min_fields=1)
    try:
        _, header = next(records)
    except StopIteration:
        raise DataFormatError(f"{path}: the file is empty") from None
    position = {}
    for arg, col in wanted.items():
        if col not in header:
            raise KeyError(f"{arg}: column {col!r} not in the header of {path} (columns: {header})")
        position[arg] = header.index(col)
    raw = {arg: [] for arg in wanted}
    for lineno, parts in records:
        if len(parts) != len(header):
            raise DataFormatError(
                f"{path}:{lineno}: expected {len(header)} fields separated by {sep!r}, got {len(parts)}"
            )
        for arg, pos in position.items():
            raw[arg].append((lineno, parts[pos]))
    out = {}
    for arg, values in raw.items():
        if arg in ("user", "item"):
            strings = np.array([v for _, v in values])
            try:
                out[arg] = strings.astype(np.int64)
            except ValueError:
                out[arg] = strings
        else:
            kind = float if arg == "rating" else int
            out[arg] = np.array([_convert(path, n, v, kind, wanted[arg]) for n, v in values])
    return out
