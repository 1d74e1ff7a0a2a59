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
    """Maps ids to ``dim``-wide vectors, one interface for two kinds of input.

    Without ``features`` it is an ID embedding table ``[num, dim]``. With
    ``features`` (a fixed ``[num, F]`` matrix, e.g. text-encoder outputs) row
    ``i`` is ``features[i]`` through a learned linear projection ``F -> dim``;
    the matrix is a buffer, so it is saved with the model but not trained.
    """

    def __init__(self, num: int, dim: int, features: torch.Tensor | None = None):
        super().__init__()
        self.num, self.dim = num, dim
        if features is None:
            self.embedding = nn.Embedding(num, dim)
            nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        else:
            self.register_buffer("features", features.to(torch.get_default_dtype()).contiguous())
            self.projection = nn.Linear(features.shape[1], dim)

    @property
    def uses_features(self) -> bool:
        return hasattr(self, "features")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [...]`` -> ``[..., dim]``."""
        if self.uses_features:
            return self.projection(self.features[ids])
        return self.embedding(ids)

    def all(self) -> torch.Tensor:
        """Every row, ``[num, dim]``."""
        if self.uses_features:
            return self.projection(self.features)
        return self.embedding.weight


class MLP(nn.Module):
    """Linear layers with an activation and dropout between consecutive ones.

    ``widths`` are the output widths of the layers in order. With
    ``activate_last`` the last layer's output is activated too (a tower whose
    output feeds another layer, as in NeuMF). :meth:`from_first` runs
    everything after the first linear layer, so a fast path can compute that
    layer's pre-activation its own way (split into per-user and per-item
    terms) and share the rest of the network.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], activation: str, dropout: float, activate_last: bool = False):
        super().__init__()
        dims = [in_dim, *widths]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
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
