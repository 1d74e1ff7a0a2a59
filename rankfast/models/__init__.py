"""Ranking models, one plain-PyTorch definition each (the reference for every fast path).

Every model is built from its config dataclass, ``Model(config)`` (plus
``user_features=`` / ``item_features=`` when the config says that side is
represented by precomputed feature vectors), and scores aligned pairs:
``model(users [B], items [B], history [B, L] = None, lengths [B] = None) -> [B]``
raw scores (logits). Only :class:`AttentionModel` and :class:`SASRec` use ``history`` and
``lengths``. ``model.save(dir)`` / :func:`load_model` round-trip a model
through ``config.json`` + ``model.safetensors``.
"""

from rankfast.models.attention import AttentionConfig, AttentionModel
from rankfast.models.base import ModelConfig, RankingModel, load_model
from rankfast.models.dot import DotConfig, DotModel
from rankfast.models.layers import MLP, Representation
from rankfast.models.mlp import MLPConfig, MLPModel
from rankfast.models.neumf import NeuMF, NeuMFConfig
from rankfast.models.sequential import SASRec, SASRecConfig

__all__ = [
    "AttentionConfig",
    "AttentionModel",
    "DotConfig",
    "DotModel",
    "MLP",
    "MLPConfig",
    "MLPModel",
    "ModelConfig",
    "NeuMF",
    "NeuMFConfig",
    "RankingModel",
    "Representation",
    "SASRec",
    "SASRecConfig",
    "load_model",
]
