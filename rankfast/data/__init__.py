"""Interaction data: the container, loaders, splits, negative sampling and histories."""

from rankfast.data.fields import Features, Field, FieldTable, Schema, build_features
from rankfast.data.interactions import MAPPINGS_FILE, IdMap, Interactions
from rankfast.data.loaders import MOVIELENS_FIELDS, DataFormatError, NCFData, load_movielens, load_ncf, load_table
from rankfast.data.sampling import (
    NegativeSampler,
    event_histories,
    history_features,
    sequence_windows,
    user_histories,
)
from rankfast.data.splits import leave_last_out, random_split, temporal_split
from rankfast.data.synthetic import synthetic_interactions

__all__ = [
    "MAPPINGS_FILE",
    "IdMap",
    "Interactions",
    "DataFormatError",
    "Features",
    "Field",
    "FieldTable",
    "MOVIELENS_FIELDS",
    "Schema",
    "build_features",
    "NCFData",
    "load_movielens",
    "load_ncf",
    "load_table",
    "NegativeSampler",
    "event_histories",
    "user_histories",
    "history_features",
    "sequence_windows",
    "random_split",
    "temporal_split",
    "leave_last_out",
    "synthetic_interactions",
]
