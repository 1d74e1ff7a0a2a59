"""Feature fields inside models: per-field vectors, a side's representation with its
fields, and the context of an impression.

- :class:`FieldEmbedding` turns encoded field values (``rankfast.data.fields``) into one
  vector per field: an embedding row (categorical), the mean or sum of a bag's rows
  (multi-valued, -1 padding ignored; an empty bag is zero), a linear map of the numbers
  (dense).
- :class:`FieldRepresentation` is a side's :class:`Representation` (the user or item id)
  that also holds the side's encoded fields as buffers, a row per id, so
  ``model.user_repr(users)`` needs nothing but the ids. ``per_field(ids)`` gives the id's
  vector and each field's apart, ``[..., 1 + F, dim]`` (factorization machines, DCN);
  calling it gives their sum (every other model: the fields fold into the id's vector,
  so every per-user / per-item fast path covers them unchanged).
- Context fields (one value per impression) are given with each call, ``context=
  {name: values}``; :func:`check_context` checks such a mapping and fills the fields of a
  missing one with the out-of-vocabulary row (a dense field with zeros).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rankfast.data.fields import OOV, PAD, Field, FieldTable, check_values
from rankfast.models.layers import Representation

__all__ = [
    "FACTOR_INIT_STD",
    "FieldEmbedding",
    "FieldRepresentation",
    "check_context",
    "default_context",
    "init_factors",
    "pool_bags",
]

#: The standard deviation the field models (FM, DeepFM, DCN-v2) draw their embedding tables
#: with: small, so that the pairwise and cross terms start near zero (measured on MovieLens
#: CTR: the default ``dim ** -0.5`` cost DeepFM 0.07 test AUC after one epoch).
FACTOR_INIT_STD = 0.01


class FieldEmbedding(nn.Module):
    """One ``dim``-wide vector per field of ``fields``; ``forward(values) -> [..., F, dim]``
    where ``values[name]`` is the field's encoded values ``[...]`` (categorical),
    ``[..., max_len]`` (multi) or ``[..., dim_f]`` (dense). A multi-valued field's table
    has a last row more, the padding's, which pooling leaves out (``F.embedding_bag``)."""

    def __init__(self, fields: Iterable[Field], dim: int):
        super().__init__()
        self.fields = tuple(fields)
        self.embeddings = nn.ModuleDict()
        for f in self.fields:
            if f.kind == "dense":
                self.embeddings[f.name] = nn.Linear(f.dim, dim, bias=False)
            else:
                # A bag's padding reads one more row, which embedding_bag leaves out of the pooling.
                table = nn.Embedding(f.rows + (f.kind == "multi"), dim)
                nn.init.normal_(table.weight, std=dim**-0.5)
                self.embeddings[f.name] = table

    def vectors(self, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each field's vectors ``[..., dim]``, in order."""
        out = []
        for f in self.fields:
            weight, v = self.embeddings[f.name].weight, values[f.name]
            if f.kind == "dense":
                out.append(F.linear(v.to(weight.dtype), weight))
            elif f.kind == "categorical":
                out.append(F.embedding(v, weight))
            else:
                out.append(pool_bags(v, weight, f.pooling))
        return out

    def forward(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.vectors(values), dim=-2)


#: Bags over at most this many table rows pool on a CPU as one matmul, ``multi_hot(bags) @ table``,
#: when the multi-hot matrix has at most :data:`MULTI_HOT_MAX_ELEMENTS` entries; others go through
#: ``F.embedding_bag``. Measured on one CPU core (batch 256, dim 16, bags of up to 10), forward and
#: backward: 109 us for a 21-row table against embedding_bag's 242 us (most of it its backward's
#: sort and zeroing), 2% of a DCN-v2 training step on MovieLens' genres; at 1,474 rows the matmul
#: takes 1.9x as long (bench/bench_pooling.py). On a GPU embedding_bag is one kernel and stays.
MULTI_HOT_MAX_ROWS = 256
MULTI_HOT_MAX_ELEMENTS = 1 << 20


def pool_bags(bags: torch.Tensor, weight: torch.Tensor, pooling: str) -> torch.Tensor:
    """The ``pooling`` (``"mean"`` or ``"sum"``) of ``weight``'s rows named by ``bags [..., max_len]``
    (:data:`PAD` slots left out; an empty bag pools to zero), ``[..., dim]``. The table's last row
    is the padding's, which no bag reads and which gets no gradient."""
    pad = weight.shape[0] - 1
    valid = bags != PAD
    slots = torch.where(valid, bags, pad)
    flat = slots.reshape(-1, bags.shape[-1])
    multi_hot = (
        weight.device.type == "cpu"
        and weight.shape[0] <= MULTI_HOT_MAX_ROWS
        and flat.shape[0] * weight.shape[0] <= MULTI_HOT_MAX_ELEMENTS
    )
    if not multi_hot:
        pooled = F.embedding_bag(flat, weight, mode=pooling, padding_idx=pad)
        return pooled.view(*bags.shape[:-1], -1)
    share = valid.to(weight.dtype)
    if pooling == "mean":
        share = share / valid.sum(-1, keepdim=True).clamp_min(1)
    hot = weight.new_zeros(*bags.shape[:-1], weight.shape[0]).scatter_add_(-1, slots, share)
    with torch.autocast("cpu", enabled=False):  # pooled in the table's dtype, as embedding_bag pools
        return hot @ weight


class _Table(nn.Module):
    """The encoded values of a side's fields, a buffer per field (``tables.<name>``)."""

    def __init__(self, fields: Sequence[Field], num: int, table: FieldTable | None):
        super().__init__()
        values = default_context(fields, num, None) if table is None else table.tensors()
        for f in fields:
            self.register_buffer(f.name, values[f.name].clone())

    def lookup(self, fields: Sequence[Field], ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name)[ids] for f in fields}

    def check(self, fields: Sequence[Field], where: str) -> None:
        """Raises ``ValueError`` naming the field and row of a value outside its field's rows
        (e.g. a stored table that does not fit the vocabulary in the config)."""
        for f in fields:
            table = getattr(self, f.name)
            check_values(f, table, table.shape[0], where=where)


class FieldRepresentation(Representation):
    """A side's ids with their feature fields (see the module docstring): row ``i`` is the
    id's vector (a :class:`Representation`: an ID embedding, feature vectors or both) plus
    the vectors of ``i``'s fields. ``table`` holds the encoded values, one row per id; without
    it every id reads the out-of-vocabulary rows until a state dict fills the buffers (as
    :func:`rankfast.models.load_model` does)."""

    def __init__(
        self,
        num: int,
        dim: int,
        fields: Sequence[Field],
        table: FieldTable | None = None,
        features: torch.Tensor | None = None,
        hybrid: bool = False,
    ):
        super().__init__(num, dim, features, hybrid)
        self.field_list = tuple(fields)
        self.fields = FieldEmbedding(self.field_list, dim)
        self.tables = _Table(self.field_list, num, table)

    def field_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The fields' vectors alone, ``[..., F, dim]``."""
        return self.fields(self.tables.lookup(self.field_list, ids))

    def vectors(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The id's vector, then each field's, ``[..., dim]`` each."""
        return [super().forward(ids), *self.fields.vectors(self.tables.lookup(self.field_list, ids))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + self.field_vectors(ids).sum(-2)

    def all(self) -> torch.Tensor:
        return self(torch.arange(self.num, device=next(self.tables.buffers()).device))

    def extend(self, features: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "add_rows: this side has feature fields "
            f"({', '.join(f.name for f in self.field_list)}), and new rows would have no field values"
        )


def default_context(fields: Sequence[Field], n: int, device) -> dict[str, torch.Tensor]:
    """Values of ``fields`` for ``n`` rows when nothing is known: the out-of-vocabulary row
    (categorical), a bag of it (multi), zeros (dense)."""
    out = {}
    for f in fields:
        if f.kind == "dense":
            out[f.name] = torch.zeros(n, f.dim, device=device)
        elif f.kind == "categorical":
            out[f.name] = torch.full((n,), OOV, dtype=torch.int64, device=device)
        else:
            bag = torch.full((n, f.max_len), PAD, dtype=torch.int64, device=device)
            bag[:, 0] = OOV
            out[f.name] = bag
    return out


def check_context(fields: Sequence[Field], context, rows: int, device) -> dict[str, torch.Tensor] | None:
    """``context`` (``{name: encoded values}``, one row per user or pair) for a model reading
    context ``fields``, checked and on ``device``: every field present, nothing else, the
    shapes, dtypes and ranges of :class:`rankfast.data.fields.FieldTable`. ``None`` gives
    :func:`default_context`. For a model without context fields, ``None``."""
    if not fields:
        return None
    if context is None:
        return default_context(fields, rows, device)
    if not isinstance(context, Mapping):
        raise TypeError(f"context: expected a mapping of field name to values, got {type(context).__name__}")
    names = {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in context]
    if missing:
        raise ValueError(f"context: no values for the context fields {missing} (the model reads {sorted(names)})")
    unknown = sorted(set(context) - names)
    if unknown:
        raise ValueError(f"context: {unknown} are not context fields of the model (it reads {sorted(names)})")
    out = {}
    for f in fields:
        value = context[f.name]
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if f.kind == "dense" and value.dim() == 1 and f.dim == 1:
            value = value[:, None]
        out[f.name] = check_values(f, value.to(device), rows, where="context")
        if f.kind == "dense":
            out[f.name] = out[f.name].float()
    return out


def init_factors(model: nn.Module, std: float = FACTOR_INIT_STD) -> None:
    """Draws every embedding table of ``model``'s fields and ids from ``N(0, std^2)`` (a
    hybrid side's ID part stays zero: it starts as the projected features alone)."""
    for module in model.modules():
        if isinstance(module, FieldEmbedding):
            for table in module.embeddings.values():
                if isinstance(table, nn.Embedding):
                    nn.init.normal_(table.weight, std=std)
        elif isinstance(module, Representation) and hasattr(module, "embedding") and not module.hybrid:
            nn.init.normal_(module.embedding.weight, std=std)
