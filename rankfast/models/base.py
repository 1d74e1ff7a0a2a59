"""Config base class, model base class, and saving/loading (config.json + model.safetensors)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass
from typing import ClassVar

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from rankfast._io import atomic_file
from rankfast.data.fields import Features, Schema
from rankfast.models.fields import FieldEmbedding, FieldRepresentation, default_context
from rankfast.models.layers import ACTIVATIONS, Representation

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: A config.json is a few hundred bytes; a larger one is refused unparsed.
MAX_CONFIG_BYTES = 1 << 20

_MODEL_TYPES: dict[str, type[RankingModel]] = {}


# --- config validation helpers ---------------------------------------------------------


def check_positive_int(owner: str, name: str, value, *, optional: bool = False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")


def check_widths(owner: str, name: str, value, *, allow_empty: bool = True) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{owner}.{name}: expected a sequence of layer widths, got {value!r}")
    widths = tuple(value)
    for w in widths:
        check_positive_int(owner, name, w)
    if not widths and not allow_empty:
        raise ValueError(f"{owner}.{name}: needs at least one layer width")
    return tuple(int(w) for w in widths)


def check_activation(owner: str, value: str):
    if value not in ACTIVATIONS:
        raise ValueError(f"{owner}.activation: expected one of {sorted(ACTIVATIONS)}, got {value!r}")


def check_dropout(owner: str, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.dropout: expected a probability in [0, 1), got {value!r}")


@dataclass
class ModelConfig:
    """Fields every model has.

    ``user_feature_dim`` / ``item_feature_dim``: ``None`` for an ID embedding
    table; an int ``F`` when that side is represented by precomputed feature
    vectors ``[num, F]`` through a learned projection (the vectors are passed
    to the model's constructor and saved with the weights).
    ``user_hybrid`` / ``item_hybrid``: that side's rows are an ID embedding
    plus the projected feature vectors (needs the feature dim); rows added
    after training (cold start) have a zero ID part.
    ``fields``: feature fields (:class:`rankfast.data.fields.Field`, fitted, e.g.
    ``train.features.schema``; saved with the model, vocabularies included). A
    user-side field's vector joins the user's, an item-side field's the item's
    (:class:`rankfast.models.fields.FieldRepresentation`); context fields are read
    by the models that take a context (``reads_context``).
    """

    num_users: int
    num_items: int
    dim: int
    user_feature_dim: int | None = None
    item_feature_dim: int | None = None
    user_hybrid: bool = False
    item_hybrid: bool = False
    fields: tuple = ()

    def __post_init__(self):
        owner = type(self).__name__
        try:
            self.fields = Schema(self.fields).fields
        except (TypeError, ValueError) as err:
            raise ValueError(f"{owner}.fields: {err}") from None
        for f in self.fields:
            if not f.fitted:
                raise ValueError(
                    f"{owner}.fields: field {f.name!r} is not fitted (no vocabulary, max_len or dim); take the fields "
                    "of the data's features (data.features.schema)"
                )
        for name in ("num_users", "num_items", "dim"):
            check_positive_int(owner, name, getattr(self, name))
        for name in ("user_feature_dim", "item_feature_dim"):
            check_positive_int(owner, name, getattr(self, name), optional=True)
        for side in ("user", "item"):
            hybrid = getattr(self, f"{side}_hybrid")
            if not isinstance(hybrid, bool):
                raise ValueError(f"{owner}.{side}_hybrid: expected a bool, got {hybrid!r}")
            if hybrid and getattr(self, f"{side}_feature_dim") is None:
                raise ValueError(
                    f"{owner}.{side}_hybrid: needs {side}_feature_dim (an ID part plus projected features)"
                )


# --- model base class ------------------------------------------------------------------


class RankingModel(nn.Module):
    """Base of the ranking models: representations, config, save and load.

    Subclasses define ``forward(users, items, history=None, lengths=None)``
    returning raw scores ``[B]`` for aligned (user, item) pairs; that forward
    is the reference implementation every fast scoring path is tested against.
    """

    config_class: ClassVar[type[ModelConfig]]
    #: Whether ``forward`` needs the users' histories (``history`` and ``lengths``).
    uses_history: ClassVar[bool] = False
    #: Whether ``forward`` takes ``context=`` (the context fields of an impression).
    reads_context: ClassVar[bool] = False
    #: Whether the model has a user representation ``user_repr`` (a model that
    #: represents a user by their history alone, such as SASRec, has none).
    has_user_repr: ClassVar[bool] = True
    #: Whether user feature vectors go through a learned projection (False: the vectors are the
    #: user rows themselves, as :class:`rankfast.models.ItemItem` reads its history rows).
    projects_user_features: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _MODEL_TYPES[cls.__name__] = cls

    def __init__(
        self, config: ModelConfig, repr_dim: int, user_features=None, item_features=None, features: Features = None
    ):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config: {type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        schema = Schema(config.fields)
        self.context_fields = schema.side("context")
        if self.context_fields and not self.reads_context:
            raise ValueError(
                f"config.fields: {type(self).__name__} reads no context fields, and "
                f"{[f.name for f in self.context_fields]} are context fields (FMModel, DeepFM and DCNv2 read them)"
            )
        if features is not None:
            if not isinstance(features, Features):
                raise TypeError(f"features: expected rankfast.data.fields.Features, got {type(features).__name__}")
            if not schema:
                raise ValueError("features: given, but config.fields is empty (the model reads no feature fields)")
            features = features.select(schema)
        if self.has_user_repr:
            self.user_repr = _representation(
                "user",
                config,
                repr_dim,
                features,
                _check_features(
                    "user_features", user_features, config.num_users, config.user_feature_dim, "user_feature_dim"
                ),
                project=self.projects_user_features,
            )
        elif user_features is not None or schema.side("user"):
            raise ValueError(
                f"user_features, config.fields: {type(self).__name__} represents users by their history alone; "
                "it takes no user features or user-side fields"
            )
        self.item_repr = _representation(
            "item",
            config,
            repr_dim,
            features,
            _check_features(
                "item_features", item_features, config.num_items, config.item_feature_dim, "item_feature_dim"
            ),
        )
        if self.context_fields:
            self.context_repr = FieldEmbedding(self.context_fields, repr_dim)

    @property
    def uses_context(self) -> bool:
        """Whether the model reads context fields (``forward(..., context=)``)."""
        return bool(self.context_fields)

    def context_vectors(self, context, like: torch.Tensor) -> list[torch.Tensor]:
        """The vectors of the context fields, each ``[*like.shape, repr_dim]``, from ``context``
        (``{name: encoded values}`` with ``like``'s leading shape) or, when None, the
        out-of-vocabulary values (:func:`rankfast.models.fields.default_context`)."""
        if not self.context_fields:
            return []
        if context is None:
            flat = default_context(self.context_fields, like.numel(), like.device)
            context = {k: v.view(*like.shape, *v.shape[1:]) for k, v in flat.items()}
        return self.context_repr.vectors(context)

    def request_fields(self, users, context=None) -> torch.Tensor:
        """``[U, Fu + Fc, repr_dim]``: the user side's field vectors then the context's, the part
        of :meth:`field_vectors` that is the same for all of a request's candidates."""
        return torch.stack([*self.user_repr.vectors(users), *self.context_vectors(context, users)], dim=-2)

    def field_vectors(self, users, items, context=None) -> torch.Tensor:
        """``[B, F, repr_dim]``: every field's vector for aligned pairs, in the order the
        field models concatenate them: the user side (the user id first, then the user
        fields), the context fields, the item side (the item id first, then the item fields)."""
        return torch.stack(
            [*self.user_repr.vectors(users), *self.context_vectors(context, users), *self.item_repr.vectors(items)],
            dim=-2,
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory``
        (created if needed), each atomically; other files there are left alone.
        This is the model alone: :func:`rankfast.ranker.save_model_dir` writes
        what serving needs."""
        meta = {"model_type": type(self).__name__, "config": dataclasses.asdict(self.config)}
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        with atomic_file(os.path.join(directory, CONFIG_FILE)) as path:
            _write_json(path, meta)
        with atomic_file(os.path.join(directory, WEIGHTS_FILE)) as path:
            safetensors.torch.save_file(tensors, path)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> RankingModel:
        """Reads a model saved by :meth:`save`; it must be a ``cls``."""
        model = load_model(directory, device)
        if not isinstance(model, cls):
            raise ValueError(
                f"{os.path.join(directory, CONFIG_FILE)}: holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> RankingModel:
    """Reads any model saved by :meth:`RankingModel.save`, checking what it
    reads; the model comes back in eval mode, in the saved dtype.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an
    unreadable file, an unknown model type, a config the model rejects, or
    tensors whose names, shapes or kinds (floating point or not) do not match
    the config. Nothing is allocated for the model before its config is found
    to match the tensors in the file, so a config declaring huge sizes fails
    at once.
    """
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (expected a directory written by model.save)")
    with open(config_path, "rb") as f:
        config = f.read(MAX_CONFIG_BYTES + 1)
    with open(weights_path, "rb") as f:
        weights = f.read()
    return model_from_bytes(config, weights, device, directory=directory)


def model_from_bytes(
    config: bytes, weights: bytes, device: str | torch.device = "cpu", *, directory=""
) -> RankingModel:
    """:func:`load_model` of the contents of ``config.json`` and
    ``model.safetensors`` (``directory`` only names them in errors)."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if len(config) > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_path}: not a rankfast model config (over {MAX_CONFIG_BYTES} bytes)")
    try:
        meta = json.loads(config.decode("utf-8"))
        model_type, fields = meta["model_type"], meta["config"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"{config_path}: not a rankfast model config ({err!r})") from err
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPES:
        raise ValueError(f"{config_path}: unknown model_type {model_type!r}; known: {sorted(_MODEL_TYPES)}")
    cls = _MODEL_TYPES[model_type]
    try:
        config = cls.config_class(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: config does not fit {cls.config_class.__name__} ({err})") from err
    try:
        tensors = safetensors.torch.load(weights)
    except SafetensorError as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err

    features = {
        "user_features": tensors.get("user_repr.features"),
        "item_features": tensors.get("item_repr.features"),
    }
    try:  # the shapes the config implies, without allocating them
        with torch.device("meta"):
            expected = cls(config, **{k: v if v is None else v.to("meta") for k, v in features.items()}).state_dict()
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).partition("\n")[0]  # torch's message may go on with a C++ trace
        raise ValueError(f"{weights_path}: does not fit {config_path} ({_sizes(config)}): {first}") from err
    _check_state(expected, tensors, weights_path, f"{config_path} ({_sizes(config)})")
    model = cls(config, **features)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        model.to(float_dtypes.pop())
    model.load_state_dict(tensors)
    for name, module in model.named_modules():  # encoded field values must fit the vocabularies in the config
        if isinstance(module, FieldRepresentation):
            module.tables.check(module.field_list, f"{weights_path}: {name}.tables")
    return model.to(device).eval()


# --- helpers ---------------------------------------------------------------------------


def _representation(side: str, config: ModelConfig, dim: int, features: Features | None, vectors, project: bool = True):
    """A side's :class:`Representation`, or with feature fields on that side a
    :class:`FieldRepresentation` holding their encoded values (``features``'s table);
    ``project=False``: the feature vectors are the rows themselves (no fields then)."""
    num, hybrid = getattr(config, f"num_{side}s"), getattr(config, f"{side}_hybrid")
    fields = Schema(config.fields).side(side)
    if not fields:
        return Representation(num, dim, vectors, hybrid, project=project)
    table = None if features is None else getattr(features, side)
    if table is not None and len(table) != num:
        raise ValueError(f"features: the {side} table has {len(table)} rows, the model {num} {side}s")
    return FieldRepresentation(num, dim, fields, table, vectors, hybrid)


def _check_features(name, features, num, feature_dim, config_field):
    if feature_dim is None:
        if features is not None:
            raise ValueError(f"{name}: given, but config.{config_field} is None (ID embeddings)")
        return None
    if features is None:
        raise ValueError(f"{name}: required, since config.{config_field} = {feature_dim}")
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor [{num}, {feature_dim}]")
    if tuple(features.shape) != (num, feature_dim):
        raise ValueError(f"{name}: expected shape ({num}, {feature_dim}), got {tuple(features.shape)}")
    return features


def _check_state(expected: dict, found: dict, path: str, config: str):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    for name, tensor in expected.items():
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(found[name].shape)}, {config} needs {tuple(tensor.shape)}"
            )
        if found[name].is_floating_point() != tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} is {found[name].dtype}, the model needs {tensor.dtype}")


def _sizes(config: ModelConfig) -> str:
    """The config's size fields, ``num_users=.., num_items=.., dim=..``, for error messages."""
    fields = dataclasses.asdict(config).items()
    return ", ".join(f"{k}={v}" for k, v in fields if isinstance(v, int) and not isinstance(v, bool))


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
