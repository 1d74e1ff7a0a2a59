"""Texts for items and users, pooled user vectors, and cold-start rows."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rankfast._ids import check_history, history_mask


def render_texts(template: str, fields) -> list[str]:
    """One text per record from a ``str.format`` template, e.g. ``"{title}. Genres: {genres}"``.

    ``fields``: a mapping of column name to equal-length sequences (a dict of
    lists, a pandas DataFrame) or a sequence of mappings (one per record).
    """
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if isinstance(fields, Mapping) or hasattr(fields, "columns"):
        columns = {name: fields[name] for name in names if name in fields}
        missing = [name for name in names if name not in columns]
        if missing:
            raise KeyError(f"template fields {missing} are not columns of the records")
        lengths = {len(col) for col in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"fields: columns have different lengths {sorted(lengths)}")
        count = lengths.pop() if lengths else 0
        records = [{name: columns[name][i] for name in names} for i in range(count)]
    elif isinstance(fields, Sequence):
        records = list(fields)
    else:
        raise TypeError(f"fields: expected a mapping of columns or a sequence of records, got {type(fields).__name__}")
    texts = []
    for i, record in enumerate(records):
        try:
            texts.append(template.format(**record))
        except KeyError as err:
            raise KeyError(f"record {i}: no field {err} for the template") from None
    return texts


def pool_history(item_vectors: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each user's history item vectors: ``[I, d]``, ``[U, L]``, ``[U]`` -> ``[U, d]``.

    Users with an empty history get a zero vector.
    """
    history, lengths = check_history(history, lengths, num_items=item_vectors.shape[0], device=item_vectors.device)
    valid = history_mask(lengths, history.shape[1])
    vectors = item_vectors[history.clamp(0, item_vectors.shape[0] - 1)] * valid.unsqueeze(-1)
    return vectors.sum(1) / lengths.clamp_min(1).unsqueeze(-1).to(vectors.dtype)


def add_rows(model: nn.Module, side: str, features: torch.Tensor) -> torch.Tensor:
    """Cold start: appends users or items represented by ``features`` (text
    vectors) to a feature-based model; returns their new ids.

    Items unseen in training get vectors from their text; users without an
    ID embedding get their history's pooled text vectors (:func:`pool_history`).
    Whatever the model learned per id is zero for the new rows: a hybrid
    representation's ID part and a per-id bias (``DotModel.item_bias``), so
    they are scored from their features alone.
    """
    if side not in ("item", "user"):
        raise ValueError(f"side: expected 'item' or 'user', got {side!r}")
    representation = getattr(model, f"{side}_repr")
    if not getattr(representation, "uses_features", False):
        raise ValueError(f"model.{side}_repr: ID embeddings cannot represent unseen {side}s; use {side} features")
    ids = representation.extend(features)
    bias = getattr(model, f"{side}_bias", None)
    if isinstance(bias, nn.Parameter):
        setattr(
            model,
            f"{side}_bias",
            nn.Parameter(torch.cat([bias.detach(), bias.new_zeros(len(ids))]), requires_grad=bias.requires_grad),
        )
    setattr(model.config, f"num_{side}s", representation.num)
    return ids
