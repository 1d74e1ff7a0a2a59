"""Readers for MovieLens, NCF split files and generic CSV/Parquet tables.

Every text reader goes through :func:`_read_records`, which reports a
malformed line (wrong fields, bytes that are not in the file's encoding, a CSV
field over the csv module's limit) as ``DataFormatError("path:line: what is
wrong")``, and every value through :func:`_convert` (an int beyond 64 bits, a
rating that is not a finite float32). A file with no data lines is an error
too. A UTF-8 byte order mark (as Excel writes) is skipped.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from rankfast.data.fields import Field, build_features
from rankfast.data.interactions import IdMap, Interactions

__all__ = ["DataFormatError", "NCFData", "MOVIELENS_FIELDS", "load_movielens", "load_ncf", "load_table"]

#: The feature fields :func:`load_movielens` provides (``tags`` where the directory has
#: ``tags.csv``): each movie's genres and release year (from the title), its tags
#: (lower-cased, most applied first), and each rating's hour and weekday (UTC).
MOVIELENS_FIELDS = (
    Field("genres", "item", "multi"),
    Field("year", "item"),
    Field("tags", "item", "multi", max_len=10),
    Field("hour", "context"),
    Field("weekday", "context"),
)

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
    lineno = 0
    with open(path, encoding="utf-8-sig" if encoding == "utf-8" else encoding, newline="") as f:
        lines = csv.reader(f) if sep == "," else (line.rstrip("\r\n").split(sep) for line in f)
        lines = tqdm(lines, desc=os.path.basename(path), unit=" lines", leave=False, mininterval=1.0, disable=None)
        try:
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
        except UnicodeDecodeError:  # the decoder reads ahead of the lines: find the line in the bytes
            raise DataFormatError(_undecodable(path, encoding)) from None
        except csv.Error as err:
            raise DataFormatError(f"{path}:{lineno + 1}: {err}") from None


def _undecodable(path, encoding) -> str:
    """``"path:line: ..."`` of the first line of ``path`` that is not ``encoding`` text."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as err:
                return f"{path}:{lineno}: not {encoding} text (byte {err.start + 1} of the line: {err.reason})"
    return f"{path}: not {encoding} text"


_INT64 = (-(2**63), 2**63 - 1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _convert(path, lineno, value, kind: Callable, what: str):
    """``value`` as ``kind``: ints within int64, floats finite in float32 (as they are stored)."""
    try:
        number = kind(value)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {what} {value!r} is not a valid {kind.__name__}") from None
    if kind is int and not _INT64[0] <= number <= _INT64[1]:
        raise DataFormatError(f"{path}:{lineno}: {what} {value!r} does not fit in 64 bits")
    if kind is float and not abs(number) <= _FLOAT32_MAX:  # NaN fails this too
        raise DataFormatError(f"{path}:{lineno}: {what} {value!r} is not a finite float32")
    return number


def _read_ratings(path, *, sep, encoding="utf-8", header=None, optional_timestamp=False):
    """Reads ``user, item, rating, timestamp`` lines into four numpy columns. With
    ``optional_timestamp`` the lines may have three fields instead (all alike, as NCF's
    ``.rating`` files), and the timestamps are then None."""
    records = _read_records(
        path, sep=sep, fields=4, encoding=encoding, header=header, min_fields=3 if optional_timestamp else None
    )
    users, items, ratings, stamps, width = [], [], [], [], None
    for lineno, parts in records:
        width = len(parts) if width is None else width
        if len(parts) != width or width > 4:
            raise DataFormatError(
                f"{path}:{lineno}: expected {min(width, 4)} fields separated by {sep!r}, got {len(parts)}"
            )
        users.append(_convert(path, lineno, parts[0], int, "user id"))
        items.append(_convert(path, lineno, parts[1], int, "item id"))
        ratings.append(_convert(path, lineno, parts[2], float, "rating"))
        if width == 4:
            stamps.append(_convert(path, lineno, parts[3], int, "timestamp"))
    if not users:
        raise DataFormatError(f"{path}: no interactions (the file has no data lines)")
    return (
        np.array(users, dtype=np.int64),
        np.array(items, dtype=np.int64),
        np.array(ratings, dtype=np.float32),
        np.array(stamps, dtype=np.int64) if width == 4 else None,
    )


def _item_text(title: str, genres: list[str]) -> str:
    genres = [g for g in genres if g and g != "(no genres listed)"]
    return f"{title}. Genres: {', '.join(genres)}" if genres else title


def load_movielens(path, *, fields: Sequence[Field] | None = None) -> Interactions:
    """Loads a MovieLens directory: ml-100k, ml-1m, ml-10m, ml-latest or ml-latest-small.

    The format is detected from the files present (``u.data``, ``ratings.dat``
    or ``ratings.csv``). Items are those that appear in the ratings; their
    ``item_text`` is ``"<title>. Genres: <g1>, <g2>"`` from the movie file.
    ``features`` holds the feature ``fields`` (:class:`rankfast.data.fields.Field`
    declarations, fitted on this data unless fitted already), by default those of
    :data:`MOVIELENS_FIELDS` the directory provides; ``fields=()`` loads none.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path} is not a directory")
    join = lambda name: os.path.join(path, name)  # noqa: E731
    text, movies = {}, {}
    if os.path.exists(join("u.data")):
        ratings = _read_ratings(join("u.data"), sep="\t")
        if os.path.exists(join("u.item")):
            for lineno, parts in _read_records(
                join("u.item"), sep="|", fields=5 + len(_ML100K_GENRES), encoding="latin-1"
            ):
                flags = [_convert(join("u.item"), lineno, v, int, "genre flag") for v in parts[5:]]
                genres = [g for g, on in zip(_ML100K_GENRES, flags, strict=True) if on]
                movie = _convert(join("u.item"), lineno, parts[0], int, "movie id")
                text[movie], movies[movie] = _item_text(parts[1], genres), (parts[1], genres)
    elif os.path.exists(join("ratings.dat")):
        ratings = _read_ratings(join("ratings.dat"), sep="::", encoding="latin-1")
        if os.path.exists(join("movies.dat")):
            for lineno, (mid, title, genres) in _read_records(
                join("movies.dat"), sep="::", fields=3, encoding="latin-1"
            ):
                movie = _convert(join("movies.dat"), lineno, mid, int, "movie id")
                text[movie], movies[movie] = _item_text(title, genres.split("|")), (title, genres.split("|"))
    elif os.path.exists(join("ratings.csv")):
        ratings = _read_ratings(join("ratings.csv"), sep=",", header=["userId", "movieId", "rating", "timestamp"])
        if os.path.exists(join("movies.csv")):
            records = _read_records(join("movies.csv"), sep=",", fields=3, header=["movieId", "title", "genres"])
            for lineno, (mid, title, genres) in records:
                movie = _convert(join("movies.csv"), lineno, mid, int, "movie id")
                text[movie], movies[movie] = _item_text(title, genres.split("|")), (title, genres.split("|"))
    else:
        raise FileNotFoundError(f"path: {path} has none of u.data, ratings.dat, ratings.csv")
    data = Interactions.from_raw(*ratings, item_text=text or None)
    return _movielens_features(data, path, movies, fields)


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _movielens_features(data: Interactions, path, movies: dict, fields) -> Interactions:
    """``data`` with the MovieLens feature fields asked for (see :data:`MOVIELENS_FIELDS`)."""
    items = data.item_ids.raw.tolist()
    item = {}
    if movies:
        info = [movies.get(m, ("", [])) for m in items]
        item["genres"] = [[g for g in genres if g and g not in ("(no genres listed)", "unknown")] for _, genres in info]
        item["year"] = [m.group(1) if (m := _YEAR.search(title.strip())) else None for title, _ in info]
    tags_path = os.path.join(path, "tags.csv")
    if os.path.exists(tags_path):
        counts = {m: Counter() for m in items}
        for lineno, (_, mid, tag, _) in _read_records(
            tags_path, sep=",", fields=4, header=["userId", "movieId", "tag", "timestamp"]
        ):
            tag = tag.strip().lower()
            movie = _convert(tags_path, lineno, mid, int, "movie id")
            if tag and movie in counts:
                counts[movie][tag] += 1
        item["tags"] = [[t for t, _ in sorted(counts[m].items(), key=lambda kv: (-kv[1], kv[0]))] for m in items]
    hours, days = np.divmod(data.timestamps, 3600)[0], np.divmod(data.timestamps, 86400)[0]
    context = {"hour": hours % 24, "weekday": (days + 3) % 7}  # 1970-01-01 was a Thursday; Monday is 0
    if fields is None:
        fields = [f for f in MOVIELENS_FIELDS if f.name in item or f.name in context]
    if not fields:
        return data
    features = build_features(
        fields,
        num_users=data.num_users,
        num_items=data.num_items,
        num_rows=len(data),
        item=item,
        context=context,
        where={"item": lambda j: f"{path}: movie {items[j]}", "context": lambda j: f"{path}: rating {j + 1}"},
    )
    return replace(data, features=features)


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
    train = _read_ratings(train_path, sep="\t", optional_timestamp=True)
    test = _read_ratings(test_path, sep="\t", optional_timestamp=True)
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


def load_table(
    path,
    *,
    user="user_id",
    item="item_id",
    rating=None,
    timestamp=None,
    sep=",",
    fields: Sequence[Field] = (),
    columns: dict | None = None,
    multi_sep: str = "|",
) -> Interactions:
    """Loads any CSV (with a header line) or Parquet file, given its column names.

    Ids that are all integers are kept as integers, otherwise as strings.
    ``rating`` and ``timestamp`` columns are optional. Parquet needs pyarrow.

    ``fields``: feature fields (:class:`rankfast.data.fields.Field`), each read from
    the column of its name (``columns`` maps a field name to another column), fitted
    on this file unless fitted already, into ``features``. A user-side field must have
    one value per user and an item-side field one per item (rows that disagree are an
    error naming both); a context field is read per row. An empty cell is a missing
    category (the out-of-vocabulary row) or an empty bag; multi-valued cells are split
    on ``multi_sep``; dense cells must be finite numbers.
    """
    named = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    wanted = {arg: col for arg, col in named.items() if col is not None}
    fields = tuple(fields)
    columns = dict(columns or {})
    unknown = sorted(set(columns) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"columns: {unknown} are not among the fields {[f.name for f in fields]}")
    for f in fields:
        wanted[f"field {f.name!r}"] = columns.get(f.name, f.name)
    if str(path).endswith((".parquet", ".pq")):
        data = _read_parquet(path, wanted)
    else:
        data = _read_csv_columns(path, wanted, sep)
    out = Interactions.from_raw(data["user"], data["item"], data.get("rating"), data.get("timestamp"))
    if not fields:
        return out
    lines = data.get("lines")
    where_row = (lambda j: f"{path}:{lines[j]}") if lines is not None else (lambda j: f"{path}: row {j + 1}")
    raw = {"user": {}, "item": {}, "context": {}}
    for f in fields:
        values = [_cell(f, v, multi_sep, where_row, j) for j, v in enumerate(data[f"field {f.name!r}"])]
        if f.side == "context":
            raw["context"][f.name] = values
        else:
            ids, id_map = (out.users, out.user_ids) if f.side == "user" else (out.items, out.item_ids)
            raw[f.side][f.name] = _per_id(f, ids, len(id_map), values, where_row, id_map)
    features = build_features(
        fields,
        num_users=out.num_users,
        num_items=out.num_items,
        num_rows=len(out),
        **raw,
        where={
            "user": lambda j: f"{path}: user {out.user_ids.raw[j].item()!r}",
            "item": lambda j: f"{path}: item {out.item_ids.raw[j].item()!r}",
            "context": where_row,
        },
    )
    return replace(out, features=features)


def _cell(field: Field, value, multi_sep: str, where_row, row: int):
    """A table cell as :meth:`Field.encode` takes it: a category (None when empty), a bag or a number."""
    if field.kind == "dense":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise DataFormatError(f"{where_row(row)}: field {field.name!r}: {value!r} is not a number") from None
        return float("nan") if value is None else value
    if field.kind == "multi":
        if value is None or value == "":
            return []
        return value.split(multi_sep) if isinstance(value, str) else list(value)
    return None if value is None or value == "" else value


def _per_id(field: Field, ids: np.ndarray, num: int, values: list, where_row, id_map: IdMap) -> list:
    """One value per user or item id from per-row ``values``: the rows of an id must agree."""
    first = np.full(num, -1, dtype=np.int64)
    out = [None] * num
    for row, (i, value) in enumerate(zip(ids.tolist(), values, strict=True)):
        if first[i] < 0:
            first[i], out[i] = row, value
        elif out[i] != value and not (value != value and out[i] != out[i]):  # NaN == NaN here
            raise ValueError(
                f"field {field.name!r}: {field.side} {id_map.raw[i].item()!r} has two values, {out[i]!r} "
                f"({where_row(int(first[i]))}) and {value!r} ({where_row(row)}); a {field.side}-side field has one "
                f"value per {field.side}"
            )
    return out


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
        if arg.startswith("field "):  # feature cells: None (missing) allowed, lists for multi-valued fields
            out[arg] = column.to_pylist()
            continue
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
    lines = []
    for lineno, parts in records:
        if len(parts) != len(header):
            raise DataFormatError(
                f"{path}:{lineno}: expected {len(header)} fields separated by {sep!r}, got {len(parts)}"
            )
        for arg, pos in position.items():
            raw[arg].append((lineno, parts[pos]))
        lines.append(lineno)
    if not raw["user"]:
        raise DataFormatError(f"{path}: no interactions (no lines after the header)")
    out = {"lines": lines}
    for arg, values in raw.items():
        if arg in ("user", "item"):
            strings = np.array([v for _, v in values])
            try:
                out[arg] = strings.astype(np.int64)
            except (ValueError, OverflowError):  # not all integers, or not all within int64
                out[arg] = strings
        elif arg.startswith("field "):  # feature cells stay strings
            out[arg] = [v for _, v in values]
        else:
            kind = float if arg == "rating" else int
            out[arg] = np.array([_convert(path, n, v, kind, wanted[arg]) for n, v in values])
    return out
