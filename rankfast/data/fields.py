"""Feature fields: what a model knows about a user, an item or an impression besides the ids.

A :class:`Field` is one column of side information. Its ``side`` says what it
describes and so where its values live:

- ``"user"``: one value per user, stored indexed by user id;
- ``"item"``: one value per item, stored indexed by item id;
- ``"context"``: one value per interaction (the impression: its hour, weekday,
  device...), stored per row of the log.

Its ``kind`` says how a model reads it:

- ``"categorical"``: one value, a row of an embedding table. Values are compared
  as strings (``13`` and ``"13"`` are the same category) and mapped through a
  vocabulary (given, or fitted: the distinct values seen, sorted; its ``j``-th
  value is row ``j + 1``) or,
  with ``buckets``, hashed (CRC-32) into rows ``1..buckets``. Row 0 is the shared
  out-of-vocabulary row: unknown values and missing ones (``None``) read it.
- ``"multi"``: a bag of such values (genres, tags), encoded the same way, padded
  with -1 to ``max_len`` values (the first ``max_len`` of a longer bag are kept)
  and pooled by the model (``pooling``: mean or sum over the bag; an empty bag is
  a zero vector).
- ``"dense"``: ``dim`` numbers (float32); NaN or infinity is an error.

A field declared without its vocabulary (``vocab``/``buckets``), ``max_len`` or
``dim`` is *fitted* on the data it is first built from (:func:`build_features`);
a fitted field encodes new data as it is, unknown categories going to row 0. A
model keeps its fitted fields in its config, so its vocabularies are saved with it.

:class:`FieldTable` holds the encoded values of some fields for ``n`` rows, and
:class:`Features` the three tables of a data set (users, items, interactions)
with their :class:`Schema`; :class:`rankfast.data.Interactions` carries one as
``features``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

__all__ = ["Field", "Schema", "FieldTable", "Features", "build_features", "SIDES", "KINDS", "OOV"]

SIDES = ("user", "item", "context")
KINDS = ("categorical", "multi", "dense")
POOLINGS = ("mean", "sum")
#: The out-of-vocabulary row of every categorical and multi-valued field.
OOV = 0
#: The padding value of multi-valued fields.
PAD = -1
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, repr=False)
class Field:
    """One field: ``name``, ``side`` (user, item, context), ``kind`` (categorical,
    multi, dense) and how it is encoded (see the module docstring).

    ``vocab``: the categories (distinct strings; category ``j`` is row ``j + 1``), or ``buckets``: hash into
    that many rows instead; neither: fitted from the data. ``max_len`` (multi): values
    kept per bag, default the longest bag seen. ``dim`` (dense): numbers per row,
    fitted. ``pooling`` (multi): ``"mean"`` or ``"sum"``.
    """

    name: str
    side: str
    kind: str = "categorical"
    vocab: tuple[str, ...] | None = None
    buckets: int | None = None
    max_len: int | None = None
    dim: int | None = None
    pooling: str = "mean"

    def __post_init__(self):
        what = f"field {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"field name: expected an identifier (letters, digits, _), got {self.name!r}")
        if self.side not in SIDES:
            raise ValueError(f"{what}: side must be one of {SIDES}, got {self.side!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{what}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{what}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("buckets", "max_len", "dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{what}: {name} must be a positive int, got {value!r}")
        if self.kind == "dense":
            if self.vocab is not None or self.buckets is not None or self.max_len is not None:
                raise ValueError(f"{what}: a dense field has no vocab, buckets or max_len")
        else:
            if self.dim is not None:
                raise ValueError(f"{what}: dim is for dense fields; a {self.kind} field has a vocab or buckets")
            if self.kind == "categorical" and self.max_len is not None:
                raise ValueError(f"{what}: max_len is for multi-valued fields")
            if self.vocab is not None:
                if self.buckets is not None:
                    raise ValueError(f"{what}: give a vocab or buckets, not both")
                if isinstance(self.vocab, (str, bytes)) or not isinstance(self.vocab, Iterable):
                    raise ValueError(f"{what}: vocab must be a sequence of categories, got {self.vocab!r}")
                vocab = tuple(self.vocab)
                if not all(isinstance(v, str) for v in vocab):
                    raise ValueError(f"{what}: vocab entries must be strings")
                if len(set(vocab)) != len(vocab):
                    raise ValueError(f"{what}: vocab entries must be distinct")
                object.__setattr__(self, "vocab", vocab)

    def __repr__(self) -> str:
        parts = [repr(self.name), repr(self.side), repr(self.kind)]
        if self.vocab is not None:
            shown = ", ".join(map(repr, self.vocab[:3])) + (", ..." if len(self.vocab) > 3 else "")
            parts.append(f"vocab=<{len(self.vocab)} values: {shown}>")
        parts += [f"{k}={getattr(self, k)!r}" for k in ("buckets", "max_len", "dim") if getattr(self, k) is not None]
        if self.kind == "multi":
            parts.append(f"pooling={self.pooling!r}")
        return f"Field({', '.join(parts)})"

    # --- what it is -------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        """Whether encoding needs no data: vocabulary or buckets, ``max_len``, ``dim`` known."""
        if self.kind == "dense":
            return self.dim is not None
        known = self.vocab is not None or self.buckets is not None
        return known and (self.kind == "categorical" or self.max_len is not None)

    @property
    def rows(self) -> int:
        """Embedding rows of a categorical or multi field: the OOV row plus one per category or bucket."""
        if self.kind == "dense":
            raise ValueError(f"field {self.name!r}: a dense field has no embedding rows")
        self._check_fitted()
        return 1 + (len(self.vocab) if self.vocab is not None else self.buckets)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["vocab"] is not None:
            out["vocab"] = list(out["vocab"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Field:
        if isinstance(data, Field):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"fields: expected a Field or a mapping of its attributes, got {data!r}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"fields: {dict(data).get('name', data)!r}: {err}") from None

    def _check_fitted(self):
        if not self.fitted:
            raise ValueError(
                f"field {self.name!r}: not fitted (no vocabulary, max_len or dim yet); build features from data first"
            )

    # --- fitting and encoding -------------------------------------------------------------

    def fit(self, values, where: Callable[[int], str] | None = None) -> Field:
        """This field with what it lacks (vocabulary, ``max_len``, ``dim``) taken from
        ``values`` (one per row, as :meth:`encode` takes them); a fitted field is returned as is."""
        if self.fitted:
            return self
        where = where or _row
        if self.kind == "dense":
            return replace(self, dim=_dense(self, values, where).shape[1])
        if self.kind == "categorical":
            strings, present = _categories(self, values, where)
            bag_len = None
        else:
            flat, lengths = _flatten_bags(self, values, where)
            strings, present = _categories(self, flat, _bag_rows(lengths, where))
            bag_len = self.max_len or max(1, int(lengths.max(initial=0)))
        fitted = {"max_len": bag_len} if self.kind == "multi" else {}
        if self.vocab is None and self.buckets is None:
            fitted["vocab"] = tuple(np.unique(strings[present]).tolist())
        return replace(self, **fitted)

    def encode(self, values, where: Callable[[int], str] | None = None) -> np.ndarray:
        """Encoded values of ``n`` rows. ``values``: categorical, one category (or None) a
        row; multi, one sequence of categories a row; dense, numbers ``[n]`` or ``[n, dim]``.
        ``where(j)`` names row ``j`` in errors (default ``"row j"``). Returns int64 rows
        ``[n]`` (categorical), int64 ``[n, max_len]`` padded with -1 (multi) or float32
        ``[n, dim]`` (dense)."""
        self._check_fitted()
        where = where or _row
        if self.kind == "dense":
            out = _dense(self, values, where)
            if out.shape[1] != self.dim:
                raise ValueError(f"field {self.name!r}: expected {self.dim} numbers a row, got {out.shape[1]}")
            return out
        if self.kind == "categorical":
            return self._codes(*_categories(self, values, where))
        flat, lengths = _flatten_bags(self, values, where)
        codes = self._codes(*_categories(self, flat, _bag_rows(lengths, where)))
        out = np.full((len(lengths), self.max_len), PAD, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        kept = np.minimum(lengths, self.max_len)
        cols = np.arange(self.max_len)
        valid = cols < kept[:, None]
        out[valid] = codes[(starts[:, None] + cols)[valid]]
        return out

    def _codes(self, strings: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Rows of categories given as strings (``present`` False: missing, row 0)."""
        codes = np.zeros(len(strings), dtype=np.int64)
        if not len(strings):
            return codes
        if self.buckets is not None:
            distinct, inverse = np.unique(strings, return_inverse=True)
            hashed = np.array([1 + zlib.crc32(s.encode("utf-8")) % self.buckets for s in distinct.tolist()])
            codes = hashed[inverse].astype(np.int64)
        elif self.vocab:
            vocab = np.asarray(self.vocab)
            order = np.argsort(vocab, kind="stable")
            pos = np.minimum(np.searchsorted(vocab[order], strings), len(vocab) - 1)
            codes = np.where(vocab[order][pos] == strings, order[pos] + 1, OOV).astype(np.int64)
        codes[~present] = OOV
        return codes


def _row(j: int) -> str:
    return f"row {j}"


def _bag_rows(lengths: np.ndarray, where):
    """``where`` of the flattened values of bags: each names its bag's row."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return lambda j: where(int(owner[j]))


def _categories(field: Field, values, where) -> tuple[np.ndarray, np.ndarray]:
    """``(strings, present)`` of categorical values: each as a string, and whether it is given
    (None is missing); NaN is an error naming the row."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.ndim == 1:
        arr = values
    else:
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
    if arr.dtype.kind in "iub":
        return arr.astype(str), np.ones(len(arr), dtype=bool)
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"field {field.name!r}: {where(int(bad[0]))}: {arr[bad[0]]} is not a category")
        whole = arr == np.round(arr)
        strings = np.where(whole, arr.astype(np.int64).astype(str), arr.astype(str))
        return strings.astype(str), np.ones(len(arr), dtype=bool)
    if arr.dtype.kind == "U":
        return arr, np.ones(len(arr), dtype=bool)
    present = np.array([v is not None for v in arr.tolist()], dtype=bool)
    strings = []
    for j, v in enumerate(arr.tolist()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"field {field.name!r}: {where(j)}: {v} is not a category (None marks a missing value)")
        if isinstance(v, (list, tuple, dict, set, np.ndarray)):
            raise ValueError(f"field {field.name!r}: {where(j)}: a categorical field takes one value, got {v!r}")
        if isinstance(v, float) and v == int(v):
            v = int(v)
        strings.append("" if v is None else str(v))
    return np.asarray(strings, dtype=str) if strings else np.zeros(0, dtype=str), present


def _flatten_bags(field: Field, values, where) -> tuple[list, np.ndarray]:
    """The values of every bag in order, and each bag's length."""
    flat, lengths = [], []
    for j, bag in enumerate(values):
        if bag is None:
            bag = ()
        if isinstance(bag, (str, bytes)) or not isinstance(bag, Iterable):
            raise ValueError(
                f"field {field.name!r}: {where(j)}: a multi-valued field takes a sequence of values a row, got {bag!r}"
            )
        bag = list(bag)
        flat.extend(bag)
        lengths.append(len(bag))
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out, np.asarray(lengths, dtype=np.int64)


def _dense(field: Field, values, where) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"field {field.name!r}: dense values must be numbers ({err})") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"field {field.name!r}: dense values must be [n] or [n, dim], got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(f"field {field.name!r}: {where(int(bad[0]))}: {arr[bad[0]].tolist()} is not a finite number")
    return np.ascontiguousarray(arr)


class Schema(Sequence):
    """An ordered set of :class:`Field` with distinct names: look one up by name
    (``schema["genres"]``), take a side's (``schema.side("item")``) or a subset
    (``schema.select("genres", "hour")``)."""

    def __init__(self, fields: Iterable[Field | Mapping] = ()):
        if isinstance(fields, Schema):
            fields = fields.fields
        self.fields = tuple(Field.from_dict(f) for f in fields)
        names = [f.name for f in self.fields]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"fields: names must be distinct, {repeated} repeated")

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, key):
        if isinstance(key, str):
            for f in self.fields:
                if f.name == key:
                    return f
            raise KeyError(f"field {key!r}: not in the schema (fields: {list(self.names)})")
        return self.fields[key]

    def __eq__(self, other) -> bool:
        return isinstance(other, Schema) and self.fields == other.fields

    def __repr__(self) -> str:
        return f"Schema({[f'{f.name} ({f.side} {f.kind})' for f in self.fields]})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def side(self, side: str) -> tuple[Field, ...]:
        """The fields of ``side`` (user, item or context), in order."""
        if side not in SIDES:
            raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
        return tuple(f for f in self.fields if f.side == side)

    def select(self, *names: str) -> Schema:
        """The fields named, in that order; an unknown name is a ``KeyError`` naming it."""
        return Schema(self[n] for n in names)

    def to_list(self) -> list[dict]:
        return [f.to_dict() for f in self.fields]


class FieldTable:
    """Encoded values of ``fields`` for ``n`` rows (users, items or interactions):
    ``values[name]`` is int64 ``[n]`` (categorical rows), int64 ``[n, max_len]``
    padded with -1 (multi) or float32 ``[n, dim]`` (dense), checked against the fields."""

    def __init__(self, fields: Iterable[Field], values: Mapping[str, np.ndarray], n: int):
        self.fields = tuple(fields)
        self.n = int(n)
        missing = [f.name for f in self.fields if f.name not in values]
        if missing:
            raise ValueError(f"values: no values for fields {missing}")
        self.values = {f.name: check_values(f, values[f.name], self.n) for f in self.fields}

    def __len__(self) -> int:
        return self.n

    def subset(self, index) -> FieldTable:
        """The rows at ``index`` (positions or a boolean mask)."""
        index = np.asarray(index)
        n = int(index.sum()) if index.dtype == bool else len(index)
        return FieldTable(self.fields, {k: v[index] for k, v in self.values.items()}, n)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.values.items()}


def check_values(field: Field, values, n: int, where: str = "values"):
    """``values`` of ``field`` for ``n`` rows as encoded (numpy or torch, left so), or a
    ``ValueError`` naming the field and the first bad row."""
    shape = tuple(values.shape)
    dtype = str(values.dtype).removeprefix("torch.")
    if field.kind == "dense":
        want, ok_dtype = (n, field.dim), dtype in ("float32", "float64", "float16", "bfloat16")
    else:
        want = (n,) if field.kind == "categorical" else (n, field.max_len)
        ok_dtype = dtype == "int64"
    if shape != want or not ok_dtype:
        kind = "float" if field.kind == "dense" else "int64"
        raise ValueError(
            f"{where}: field {field.name!r} ({field.side} {field.kind}) needs {kind} values of shape {want}, got "
            f"{values.dtype} {shape}"
        )
    if not n:
        return values
    if field.kind == "dense":
        finite = torch.isfinite(values) if isinstance(values, torch.Tensor) else np.isfinite(values)
        bad = (~finite).reshape(n, -1).any(1).nonzero()
        bad = bad[0] if isinstance(bad, tuple) else bad.reshape(-1)
        if len(bad):
            raise ValueError(f"{where}: field {field.name!r}: row {int(bad[0])}: not a finite number")
    else:
        low = PAD if field.kind == "multi" else 0
        flat = values.reshape(n, -1)
        bad = ((flat < low) | (flat >= field.rows)).any(1).nonzero()
        bad = bad[0] if isinstance(bad, tuple) else bad.reshape(-1)
        if len(bad):
            raise ValueError(
                f"{where}: field {field.name!r}: row {int(bad[0])}: {flat[int(bad[0])].tolist()} outside the "
                f"field's {field.rows} rows"
            )
    return values


@dataclass(frozen=True, eq=False)
class Features:
    """The encoded fields of a data set: ``user`` (a row per user id), ``item`` (a row per
    item id) and ``context`` (a row per interaction) tables, described by ``schema``."""

    schema: Schema
    user: FieldTable
    item: FieldTable
    context: FieldTable

    def __post_init__(self):
        for side in SIDES:
            table = getattr(self, side)
            if table.fields != self.schema.side(side):
                raise ValueError(f"features: the {side} table's fields do not match the schema's")

    def subset(self, index) -> Features:
        """The interactions at ``index``: the context table's rows (user and item tables stay)."""
        return replace(self, context=self.context.subset(index))

    def select(self, schema: Schema | Iterable[Field]) -> Features:
        """The tables of ``schema``'s fields only; each must be one of these features' fields,
        encoded the same way, or a ``ValueError`` names it."""
        schema = Schema(schema)
        for f in schema:
            mine = self.schema[f.name] if f.name in self.schema.names else None
            if mine is None:
                raise ValueError(f"field {f.name!r}: not in the data (its fields: {list(self.schema.names)})")
            if mine != f:
                raise ValueError(f"field {f.name!r}: {_difference(f, mine)}")
        return Features(
            schema,
            *(FieldTable(schema.side(side), getattr(self, side).values, len(getattr(self, side))) for side in SIDES),
        )


def _difference(want: Field, have: Field) -> str:
    """Why field ``have`` (the data's) cannot stand for ``want`` (a model's), for errors."""
    for name in ("side", "kind", "buckets", "max_len", "dim", "pooling"):
        if getattr(want, name) != getattr(have, name):
            return f"the model has {name}={getattr(want, name)!r}, the data {name}={getattr(have, name)!r}"
    a, b = want.vocab or (), have.vocab or ()
    return (
        f"the data's vocabulary ({len(b)} values) does not fit the model's ({len(a)} values; first difference: "
        f"{next((x, y) for x, y in zip((*a, None), (*b, None), strict=False) if x != y)!r})"
    )


def build_features(
    fields: Iterable[Field],
    *,
    num_users: int,
    num_items: int,
    num_rows: int,
    user: Mapping = {},  # noqa: B006 (read only)
    item: Mapping = {},  # noqa: B006
    context: Mapping = {},  # noqa: B006
    where: Mapping[str, Callable[[int], str]] | None = None,
) -> Features:
    """Encodes raw values into :class:`Features`, fitting the fields that are not fitted.

    ``user[name]``: the raw values of user-side field ``name``, one per user id;
    ``item[name]`` one per item id; ``context[name]`` one per interaction row (as
    :meth:`Field.encode` takes them). A field without values is a ``ValueError``
    naming it and the fields the data has. ``where[side](j)`` names row ``j`` of a
    side in errors (e.g. the raw user id, or the file and line).
    """
    schema = Schema(fields)
    raw = {"user": user, "item": item, "context": context}
    sizes = {"user": num_users, "item": num_items, "context": num_rows}
    where = dict(where or {})
    fitted, tables = [], {side: {} for side in SIDES}
    for f in schema:
        if f.name not in raw[f.side]:
            have = [f"{n} ({side})" for side in SIDES for n in raw[side]]
            raise ValueError(
                f"field {f.name!r}: not in the data (its {f.side}-side fields: {list(raw[f.side])}; all: {have})"
            )
        values = raw[f.side][f.name]
        if len(values) != sizes[f.side]:
            raise ValueError(f"field {f.name!r}: {len(values)} values for {sizes[f.side]} {f.side} rows")
        name_row = where.get(f.side, _row)
        f = f.fit(values, name_row)
        fitted.append(f)
        tables[f.side][f.name] = f.encode(values, name_row)
    schema = Schema(fitted)
    return Features(schema, *(FieldTable(schema.side(side), tables[side], sizes[side]) for side in SIDES))
