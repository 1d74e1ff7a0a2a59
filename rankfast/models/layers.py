"""Building blocks shared by the models: user/item representations and MLP towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _gelu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return F.gelu(x)  # torch has no in-place GELU


#: Activation functions by config name, each ``f(x, inplace=False)``.
ACTIVATIONS = {"relu": F.relu, "gelu": _gelu, "silu": F.silu}


class Representation(nn.Module):
    """Maps ids to ``dim``-wide vectors, one interface for three kinds of input.

    Without ``features`` it is an ID embedding table ``[num, dim]``. With
    ``features`` (a fixed ``[num, F]`` matrix, e.g. text-encoder outputs) row
    ``i`` is ``features[i]`` through a learned linear projection ``F -> dim``;
    the matrix is a buffer, so it is saved with the model but not trained.
    With ``features`` and ``hybrid=True`` row ``i`` is
    ``embedding[i] + projection(features[i])``: an ID part, zero at first,
    learns what the features miss. Rows added by :meth:`extend` (cold start)
    get a zero ID part, so they are represented by their features alone.
    With ``features`` and ``project=False`` row ``i`` is ``features[i]``
    itself, unprojected (``dim`` must be the features' width): e.g. a user's
    history row, as :class:`rankfast.models.ItemItem` reads it.
    """

    def __init__(
        self,
        num: int,
        dim: int,
        features: torch.Tensor | None = None,
        hybrid: bool = False,
        project: bool = True,
    ):
        super().__init__()
        if hybrid and features is None:
            raise ValueError("hybrid: an ID part plus projected features needs features")
        if not project:
            if features is None or hybrid:
                raise ValueError("project: rows that are the features themselves need features and no ID part")
            if features.shape[-1] != dim:
                raise ValueError(f"project: unprojected features are the rows, so dim={dim} must be their width")
        self.num, self.dim, self.hybrid = num, dim, bool(hybrid)
        if features is None or self.hybrid:
            self.embedding = nn.Embedding(num, dim)
            if self.hybrid:
                nn.init.zeros_(self.embedding.weight)
            else:
                nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        if features is not None:
            # A copy: set_features writes into the buffer, which must not be the caller's tensor.
            self.register_buffer("features", features.to(torch.get_default_dtype(), copy=True).contiguous())
            self.projection = nn.Linear(features.shape[1], dim) if project else nn.Identity()

    @property
    def uses_features(self) -> bool:
        return hasattr(self, "features")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [...]`` -> ``[..., dim]``."""
        if self.uses_features:
            return self.project(self.features[ids], ids)
        return self.embedding(ids)

    def vectors(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The side's field vectors of ``ids``, each ``[..., dim]``: here the one field, the ids' rows
        (a side with feature fields, :class:`rankfast.models.fields.FieldRepresentation`, has more)."""
        return [self(ids)]

    def per_field(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., F, dim]``: :meth:`vectors` stacked."""
        return torch.stack(self.vectors(ids), dim=-2)

    def all(self) -> torch.Tensor:
        """Every row, ``[num, dim]``."""
        if self.uses_features:
            return self.project(self.features, None)
        return self.embedding.weight

    def project(self, vectors: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows of ``ids [...]`` given their feature vectors ``vectors [..., F]``
        (``ids=None``: every row, in order); with ``hybrid`` the ID part is added."""
        rows = self.projection(vectors)
        if self.hybrid:
            rows = rows + (self.embedding.weight if ids is None else self.embedding(ids))
        return rows

    def set_features(self, features: torch.Tensor) -> None:
        """Replaces the fixed feature matrix by ``features [num, F]`` (same
        shape), keeping every learned weight: e.g. users' histories refreshed
        after training, or weighted differently for serving."""
        if not self.uses_features:
            raise ValueError("set_features: this representation is an ID embedding table; it has no features")
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError(f"features: expected a floating-point tensor {list(self.features.shape)}")
        if features.shape != self.features.shape:
            raise ValueError(f"features: expected shape {tuple(self.features.shape)}, got {tuple(features.shape)}")
        with torch.no_grad():
            self.features.copy_(features)

    def extend(self, features: torch.Tensor) -> torch.Tensor:
        """Appends rows represented by ``features [n, F]`` (a hybrid's ID part
        of them is zero); returns their ids."""
        old = self.features
        if features.dim() != 2 or features.shape[1] != old.shape[1]:
            raise ValueError(f"features: expected shape [n, {old.shape[1]}], got {tuple(features.shape)}")
        self.features = torch.cat([old, features.to(old)])
        if self.hybrid:
            weight = self.embedding.weight
            self.embedding = nn.Embedding.from_pretrained(
                torch.cat([weight.detach(), weight.new_zeros(len(features), self.dim)]), freeze=not weight.requires_grad
            )
        self.num = self.features.shape[0]
        return torch.arange(old.shape[0], self.num)


class MLP(nn.Module):
    """Linear layers with an activation and dropout between consecutive ones.

    ``widths`` are the output widths of the layers in order. With
    ``activate_last`` the last layer's output is activated too (a tower whose
    output feeds another layer, as in NeuMF). :meth:`from_first` runs
    everything after the first linear layer, so a fast path can compute that
    layer's pre-activation its own way (split into per-user and per-item
    terms) and share the rest of the network.
    """

    def __init__(
        self, in_dim: int, widths: Sequence[int], activation: str, dropout: float, activate_last: bool = False
    ):
        super().__init__()
        dims = [in_dim, *widths]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)
        self.activate_last = activate_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_first(self.linears[0](x))

    def from_first(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The network after the first linear layer, given its output ``z``.

        ``inplace`` lets activations overwrite ``z`` and the intermediates
        (less memory traffic); only for callers that own ``z`` and need no
        gradients, such as the scoring paths.
        """
        for linear in self.linears[1:]:
            z = linear(self.dropout(self.act(z, inplace=inplace)))
        if self.activate_last:
            z = self.dropout(self.act(z, inplace=inplace))
        return z
